// Line charts (and point series) as SVG text: panels side by side, each with axes, ticks, labels, a
// legend and optional vertical markers. Small and dependency-free, for the tools' --plot outputs.
#pragma once

#include <string>
#include <vector>

namespace dsa {

struct PlotSeries {
  std::string label;
  std::string color;  // any SVG color, e.g. "#1f77b4"
  std::vector<double> x, y;
  std::string end_label;     // written next to the last point, e.g. its value; may be empty
  bool points_only = false;  // a circle at each point, no line (measured beside modelled)
};

// A dashed vertical line at x with a label at its top.
struct PlotMarker {
  double x = 0;
  std::string label;
};

struct PlotPanel {
  std::string title, x_label, y_label;
  std::vector<PlotSeries> series;
  std::vector<PlotMarker> markers;
  std::vector<double> x_ticks;  // empty: nice_ticks over the data
  std::string y_tick_prefix;    // e.g. "$"
};

struct Plot {
  std::string title, subtitle;
  std::vector<PlotPanel> panels;
  int panel_width = 500, panel_height = 400;  // pixels, each
};

// About `count` round-numbered ticks (steps 1, 2, 2.5 or 5 times a power of ten) covering
// [low, high]; the first is <= low, the last >= high.
std::vector<double> nice_ticks(double low, double high, int count);

// Tick texts with one number of decimals for the whole axis, the fewest that show every tick
// exactly: {0, 0.5, 1} -> "0.0", "0.5", "1.0"; {0, 16, 32} -> "0", "16", "32". From 1e4 on
// in thousands or millions: {0, 10000, 20000} -> "0", "10K", "20K".
std::vector<std::string> tick_labels(const std::vector<double>& ticks);

// A standalone SVG document (XML, every text escaped).
std::string render_svg(const Plot& plot);

}  // namespace dsa
