#include "dsa/plot.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

namespace dsa {

namespace {

constexpr double kHeader = 64;  // title and subtitle above the panels
constexpr double kLeft = 72, kRight = 64, kTop = 40, kBottom = 56;  // panel margins
constexpr const char* kFont = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

std::string escape(const std::string& text) {
  std::string out;
  for (const char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string text(double x, double y, const std::string& body, const std::string& attributes) {
  return fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" {}>{}</text>\n", x, y, attributes,
                     escape(body));
}

// Maps data coordinates of one panel to pixels.
struct Frame {
  double left, top, width, height;  // the plot area
  double x_low, x_high, y_low, y_high;
  double px(double x) const { return left + (x - x_low) / (x_high - x_low) * width; }
  double py(double y) const { return top + height - (y - y_low) / (y_high - y_low) * height; }
};

void data_range(const PlotPanel& panel, double& x_low, double& x_high, double& y_high) {
  x_low = std::numeric_limits<double>::infinity();
  x_high = -x_low;
  y_high = 0;
  for (const auto& s : panel.series) {
    for (const double x : s.x) {
      x_low = std::min(x_low, x);
      x_high = std::max(x_high, x);
    }
    for (const double y : s.y)
      if (std::isfinite(y)) y_high = std::max(y_high, y);
  }
  if (!std::isfinite(x_low)) x_low = 0, x_high = 1;
}

std::string render_panel(const PlotPanel& panel, double origin_x, double width, double height) {
  double x_low, x_high, y_high;
  data_range(panel, x_low, x_high, y_high);
  const std::vector<double> x_ticks =
      panel.x_ticks.empty() ? nice_ticks(x_low, x_high, 8) : panel.x_ticks;
  const std::vector<double> y_ticks = nice_ticks(0, y_high, 6);
  const Frame f{origin_x + kLeft,
                kHeader + kTop,
                width - kLeft - kRight,
                height - kTop - kBottom,
                std::min(x_ticks.front(), x_low),
                std::max(x_ticks.back(), x_high),
                y_ticks.front(),
                y_ticks.back()};
  std::string svg = "<g>\n";
  svg += text(f.left + f.width / 2, kHeader + 24, panel.title,
              "text-anchor=\"middle\" font-size=\"17\" font-weight=\"bold\"");
  svg += fmt::format(
      "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"#ffffff\" "
      "stroke=\"#444444\"/>\n",
      f.left, f.top, f.width, f.height);
  const std::vector<std::string> y_labels = tick_labels(y_ticks);
  for (std::size_t i = 0; i < y_ticks.size(); ++i) {
    const double y = y_ticks[i], py = f.py(y);
    if (y != y_ticks.front()) {
      svg += fmt::format(
          "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#e4e4e4\"/>\n",
          f.left, py, f.left + f.width, py);
    }
    svg += fmt::format(
        "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#444444\"/>\n",
        f.left - 5, py, f.left, py);
    svg += text(f.left - 8, py + 4, panel.y_tick_prefix + y_labels[i],
                "text-anchor=\"end\" font-size=\"12\"");
  }
  const std::vector<std::string> x_labels = tick_labels(x_ticks);
  for (std::size_t i = 0; i < x_ticks.size(); ++i) {
    const double x = x_ticks[i], px = f.px(x);
    if (x != x_ticks.front() && x != x_ticks.back()) {
      svg += fmt::format(
          "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#e4e4e4\"/>\n",
          px, f.top, px, f.top + f.height);
    }
    svg += fmt::format(
        "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#444444\"/>\n", px,
        f.top + f.height, px, f.top + f.height + 5);
    svg += text(px, f.top + f.height + 19, x_labels[i], "text-anchor=\"middle\" font-size=\"12\"");
  }
  svg += text(f.left + f.width / 2, f.top + f.height + 44, panel.x_label,
              "text-anchor=\"middle\" font-size=\"13\"");
  const double label_x = origin_x + 18, label_y = f.top + f.height / 2;
  svg += text(label_x, label_y, panel.y_label,
              fmt::format("text-anchor=\"middle\" font-size=\"13\" transform=\"rotate(-90 "
                          "{:.1f} {:.1f})\"",
                          label_x, label_y));

  for (const auto& m : panel.markers) {
    const double px = f.px(m.x);
    svg += fmt::format(
        "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#777777\" "
        "stroke-width=\"1.2\" stroke-dasharray=\"5,4\"/>\n",
        px, f.top, px, f.top + f.height);
  }
  for (const auto& s : panel.series) {
    std::string points;
    for (std::size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      if (!points.empty()) points += ' ';
      points += fmt::format("{:.2f},{:.2f}", f.px(s.x[i]), f.py(s.y[i]));
    }
    if (s.points_only) {
      for (std::size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
        svg += fmt::format(
            "<circle cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"4.5\" fill=\"#ffffff\" stroke=\"{}\" "
            "stroke-width=\"2.5\"/>\n",
            f.px(s.x[i]), f.py(s.y[i]), escape(s.color));
      }
    } else {
      svg += fmt::format(
          "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2.5\" "
          "stroke-linejoin=\"round\"/>\n",
          points, escape(s.color));
    }
    if (!s.end_label.empty() && !s.x.empty() && !s.y.empty()) {
      svg += text(f.px(s.x.back()) + 6, f.py(s.y.back()) + 4, s.end_label,
                  fmt::format("font-size=\"12\" fill=\"{}\"", escape(s.color)));
    }
  }
  // Marker labels over the curves, on a white halo, below the legend (where the curves of a
  // cost plot rarely are).
  for (const auto& m : panel.markers) {
    svg +=
        text(f.px(m.x) + 5, f.top + 20.0 * static_cast<double>(panel.series.size()) + 40, m.label,
             "font-size=\"12\" fill=\"#555555\" stroke=\"#ffffff\" stroke-width=\"4\" "
             "stroke-linejoin=\"round\" paint-order=\"stroke\"");
  }
  // The legend, top left inside the plot area.
  double legend_width = 0;
  for (const auto& s : panel.series)
    legend_width = std::max(legend_width, 7.0 * static_cast<double>(s.label.size()));
  const double lx = f.left + 12, ly = f.top + 12;
  svg += fmt::format(
      "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"#ffffff\" "
      "fill-opacity=\"0.9\" stroke=\"#bbbbbb\"/>\n",
      lx, ly, legend_width + 48, 20.0 * static_cast<double>(panel.series.size()) + 8);
  for (std::size_t i = 0; i < panel.series.size(); ++i) {
    const double y = ly + 18 + 20.0 * static_cast<double>(i);
    if (panel.series[i].points_only) {
      svg += fmt::format(
          "<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"4.5\" fill=\"#ffffff\" stroke=\"{}\" "
          "stroke-width=\"2.5\"/>\n",
          lx + 20, y - 4, escape(panel.series[i].color));
    } else {
      svg += fmt::format(
          "<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"{}\" "
          "stroke-width=\"2.5\"/>\n",
          lx + 8, y - 4, lx + 32, y - 4, escape(panel.series[i].color));
    }
    svg += text(lx + 38, y, panel.series[i].label, "font-size=\"12\"");
  }
  return svg + "</g>\n";
}

}  // namespace

std::vector<double> nice_ticks(double low, double high, int count) {
  if (!(high > low)) high = low + (low == 0 ? 1 : std::abs(low));
  const double rough = (high - low) / std::max(1, count);
  const double magnitude = std::pow(10.0, std::floor(std::log10(rough)));
  double mantissa = 10;
  for (const double m : {1.0, 2.0, 2.5, 5.0}) {
    if (m * magnitude >= rough * (1 - 1e-9)) {
      mantissa = m;
      break;
    }
  }
  const double step = mantissa * magnitude;
  const double first = std::floor(low / step + 1e-9), last = std::ceil(high / step - 1e-9);
  // i * mantissa is exact; dividing by an exact power of ten rounds once (0.6, not 0.6000001).
  const double inverse = magnitude < 1 ? std::round(1 / magnitude) : 0;
  std::vector<double> ticks;
  for (double i = first; i <= last; ++i)
    ticks.push_back(inverse > 0 ? i * mantissa / inverse : i * mantissa * magnitude);
  return ticks;
}

std::vector<std::string> tick_labels(const std::vector<double>& ticks) {
  double largest = 0;
  for (const double t : ticks) largest = std::max(largest, std::abs(t));
  if (largest >= 1e4) {  // thousands or millions, so that the labels stay narrow
    const double unit = largest >= 1e7 ? 1e6 : 1e3;
    std::vector<double> scaled;
    for (const double t : ticks) scaled.push_back(t / unit);
    std::vector<std::string> labels = tick_labels(scaled);
    for (auto& label : labels)
      if (label.find_first_not_of("0.") != std::string::npos) label += unit == 1e6 ? "M" : "K";
    return labels;
  }
  int decimals = 0;
  for (; decimals < 9; ++decimals) {
    const double scale = std::pow(10.0, decimals);
    bool exact = true;
    for (const double t : ticks) {
      exact = exact && std::abs(std::round(t * scale) - t * scale) <
                           1e-6 * std::max(1.0, std::abs(t * scale));
    }
    if (exact) break;
  }
  std::vector<std::string> labels;
  for (const double t : ticks)
    labels.push_back(fmt::format("{:.{}f}", std::abs(t) < 1e-12 ? 0.0 : t, decimals));
  return labels;
}

std::string render_svg(const Plot& plot) {
  const double panel_w = plot.panel_width, panel_h = plot.panel_height;
  const double width = panel_w * static_cast<double>(plot.panels.size());
  const double height = kHeader + panel_h;
  std::string svg = fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"{0:.0f}\" "
      "height=\"{1:.0f}\" viewBox=\"0 0 {0:.0f} {1:.0f}\" {2}>\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n",
      width, height, kFont);
  svg += text(width / 2, 26, plot.title,
              "text-anchor=\"middle\" font-size=\"18\" font-weight=\"bold\"");
  svg += text(width / 2, 48, plot.subtitle,
              "text-anchor=\"middle\" font-size=\"13\" fill=\"#444444\"");
  for (std::size_t i = 0; i < plot.panels.size(); ++i)
    svg += render_panel(plot.panels[i], panel_w * static_cast<double>(i), panel_w, panel_h);
  return svg + "</svg>\n";
}

}  // namespace dsa
