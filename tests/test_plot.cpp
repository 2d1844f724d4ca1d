// SVG line charts: round ticks, one number of decimals per axis, escaped text, well-formed XML.
#include <gtest/gtest.h>

#include <unistd.h>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "dsa/plot.hpp"

namespace dsa {
namespace {

TEST(NiceTicks, RoundStepsCoverTheRange) {
  EXPECT_EQ(nice_ticks(0, 0.648, 6), (std::vector<double>{0, 0.2, 0.4, 0.6, 0.8}));
  EXPECT_EQ(nice_ticks(0, 0.648, 10), (std::vector<double>{0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7}));
  EXPECT_EQ(nice_ticks(0, 2.19, 6), (std::vector<double>{0, 0.5, 1, 1.5, 2, 2.5}));
  EXPECT_EQ(nice_ticks(0, 100, 4), (std::vector<double>{0, 25, 50, 75, 100}));
  EXPECT_EQ(nice_ticks(3, 17, 7), (std::vector<double>{2, 4, 6, 8, 10, 12, 14, 16, 18}));
  // An empty range still gets an axis.
  EXPECT_EQ(nice_ticks(0, 0, 5), (std::vector<double>{0, 0.2, 0.4, 0.6, 0.8, 1}));
}

TEST(TickLabels, OneNumberOfDecimalsPerAxis) {
  EXPECT_EQ(tick_labels({0, 0.5, 1, 1.5}), (std::vector<std::string>{"0.0", "0.5", "1.0", "1.5"}));
  EXPECT_EQ(tick_labels({0, 16, 32}), (std::vector<std::string>{"0", "16", "32"}));
  EXPECT_EQ(tick_labels({0, 0.25, 0.5}), (std::vector<std::string>{"0.00", "0.25", "0.50"}));
  EXPECT_EQ(tick_labels({0, 0.1, 0.2, 0.3}),
            (std::vector<std::string>{"0.0", "0.1", "0.2", "0.3"}));
}

TEST(TickLabels, ThousandsAndMillions) {
  EXPECT_EQ(tick_labels({0, 10000, 20000}), (std::vector<std::string>{"0", "10K", "20K"}));
  EXPECT_EQ(tick_labels({0, 2500, 5000, 7500, 10000}),
            (std::vector<std::string>{"0.0", "2.5K", "5.0K", "7.5K", "10.0K"}));
  EXPECT_EQ(tick_labels({0, 2e7, 4e7}), (std::vector<std::string>{"0", "20M", "40M"}));
}

TEST(RenderSvg, EscapesTextAndParsesAsXml) {
  Plot plot;
  plot.title = "a <b> & \"c\"";
  PlotPanel panel;
  panel.title = "Prefill";
  panel.x_label = "x";
  panel.y_label = "y ($)";
  panel.series = {{"dense & co", "#1f77b4", {0, 1, 2}, {0, 1, 4}, "$4"},
                  {"sparse", "#ff7f0e", {0, 1, 2}, {0, 1, 2}, ""}};
  panel.markers = {{1.5, "crossover <1.5K>"}};
  plot.panels = {panel, panel};
  const std::string svg = render_svg(plot);
  EXPECT_NE(svg.find("a &lt;b&gt; &amp; &quot;c&quot;"), std::string::npos);
  EXPECT_NE(svg.find("dense &amp; co"), std::string::npos);
  EXPECT_NE(svg.find("crossover &lt;1.5K&gt;"), std::string::npos);
  EXPECT_NE(svg.find("width=\"1000\""), std::string::npos);  // two panels of 500
  EXPECT_EQ(svg.find("<b>"), std::string::npos);
  if (std::system("/usr/bin/python3 -c 'import xml.etree.ElementTree' 2>/dev/null") != 0) {
    GTEST_SKIP() << "no python3 to parse the SVG";
  }
  const auto path =
      std::filesystem::temp_directory_path() / ("dsa-plot-" + std::to_string(::getpid()) + ".svg");
  std::ofstream(path) << svg;
  const std::string command =
      "/usr/bin/python3 -c \"import sys, xml.etree.ElementTree as E; "
      "r = E.parse(sys.argv[1]).getroot(); "
      "sys.exit(r.tag != '{http://www.w3.org/2000/svg}svg' or "
      "len(r.findall('.//{http://www.w3.org/2000/svg}polyline')) != 4)\" '" +
      path.string() + "'";
  EXPECT_EQ(std::system(command.c_str()), 0);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace dsa
