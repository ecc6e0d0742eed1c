//! The bench's PNG: grouped bars of each target's performance relative to direct Postgres
//! (1.0 = direct; higher is better: throughput as target/direct, times as direct/target).
//!
//! Text is drawn with plotters' `ab_glyph` backend from a TrueType font found at run time
//! (`$PGWARD_BENCH_FONT`, a few usual DejaVu/Liberation paths, then `fc-match`), so building
//! needs no native font library.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One group of bars (a workload): one value per series, `None` when not measured.
pub struct Group {
    pub label: String,
    pub sublabel: String,
    pub values: Vec<Option<f64>>,
}

pub struct Panel {
    pub title: String,
    pub series: Vec<String>,
    pub groups: Vec<Group>,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(230, 145, 56),  // orange
    RGBColor(120, 144, 156), // blue grey
    RGBColor(46, 125, 50),   // green
    RGBColor(21, 101, 192),  // blue
    RGBColor(198, 40, 40),   // red
    RGBColor(106, 27, 154),  // purple
];

const FONT: &str = "sans-serif";

/// The highest ratio the y axis shows; bars above it are cut, with a break mark, and labelled
/// with their value.
const Y_CAP: f64 = 2.5;

fn font_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PGWARD_BENCH_FONT") {
        return Some(PathBuf::from(p));
    }
    let known = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    ];
    if let Some(p) = known.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Some(p);
    }
    let out = std::process::Command::new("fc-match").args(["-f", "%{file}", "sans-serif:style=Regular"]).output().ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let ttf = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf") || e.eq_ignore_ascii_case("otf"));
    (ttf && p.is_file()).then_some(p)
}

fn register_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = font_path().ok_or("no TrueType font found (install fonts-dejavu-core or set PGWARD_BENCH_FONT=/path/to/font.ttf)")?;
        let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable TrueType font", path.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

pub fn draw(path: &Path, title: &str, subtitle: &[String], panels: &[Panel]) -> Result<()> {
    register_font()?;
    let heights: Vec<u32> = panels.iter().map(|p| if p.groups.len() > 3 { 560 } else { 360 }).collect();
    let width = 1400u32;
    let height = 24 + 34 + 24 * subtitle.len() as u32 + heights.iter().sum::<u32>();
    draw_inner(path, (width, height), &heights, title, subtitle, panels).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    Ok(())
}

fn draw_inner(
    path: &Path,
    size: (u32, u32),
    heights: &[u32],
    title: &str,
    subtitle: &[String],
    panels: &[Panel],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw_text(title, &(FONT, 28).into_font().color(&BLACK), (24, 14))?;
    let mut top = 54i32;
    for line in subtitle {
        root.draw_text(line, &(FONT, 17).into_font().color(&RGBColor(70, 70, 70)), (24, top))?;
        top += 24;
    }
    top += 24;
    for (panel, &h) in panels.iter().zip(heights) {
        let area = root.clone().shrink((0, top), (size.0, h));
        top += h as i32;
        draw_panel(&root, &area, panel)?;
    }
    root.present()?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Where the bars of a panel go: group `gi`'s bar for series `si` starts at `x0(gi, si)`.
struct BarLayout {
    group_w: f64,
    bar_w: f64,
    /// The top of the y axis; taller bars are cut there.
    ymax: f64,
}

impl BarLayout {
    fn x0(&self, gi: usize, si: usize) -> f64 {
        gi as f64 + (1.0 - self.group_w) / 2.0 + si as f64 * self.bar_w
    }
}

fn draw_panel(root: &Area<'_>, area: &Area<'_>, panel: &Panel) -> DrawResult {
    let n = panel.groups.len().max(1);
    let k = panel.series.len().max(1);
    let vmax = panel.groups.iter().flat_map(|g| g.values.iter().flatten()).fold(1.0f64, |a, &b| a.max(b));
    // One far-off value (connection churn with pooling: ~10×) would flatten every other bar
    // into the bottom tenth: the axis stops at Y_CAP and taller bars are drawn broken.
    let ymax = (vmax * 1.12).clamp(1.2, Y_CAP);

    draw_title_and_legend(root, area, panel)?;
    let mut chart = build_chart(area, n, ymax)?;

    // Narrower groups when there are few of them, so a lone group is not a wall of colour.
    let group_w = if n < 3 { 0.45 } else { 0.78 };
    let layout = BarLayout { group_w, bar_w: group_w / k as f64, ymax };
    draw_bars(&mut chart, panel, &layout)?;
    chart.draw_series(LineSeries::new(vec![(0.0, 1.0), (n as f64, 1.0)], BLACK.stroke_width(2)))?;
    draw_value_labels(root, &chart, panel, &layout)?;
    draw_group_labels(root, &chart, panel)
}

/// Panel title on the left, a one-line legend on the right (the chart goes below them).
fn draw_title_and_legend(root: &Area<'_>, area: &Area<'_>, panel: &Panel) -> DrawResult {
    let (x0, y0) = area.get_base_pixel();
    let (w, _) = area.dim_in_pixel();
    root.draw_text(&panel.title, &(FONT, 21).into_font().color(&BLACK), (x0 + 100, y0 + 8))?;
    let legend_font = (FONT, 15).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    let mut entries: Vec<(String, Option<RGBColor>)> =
        panel.series.iter().enumerate().map(|(i, n)| (n.clone(), Some(PALETTE[i % PALETTE.len()]))).collect();
    entries.push(("direct Postgres = 1.0".into(), None));
    let widths: Vec<i32> = entries.iter().map(|(n, _)| 30 + 9 * n.chars().count() as i32).collect();
    let mut lx = x0 + w as i32 - 30 - widths.iter().sum::<i32>();
    let ly = y0 + 20;
    for ((name, color), wd) in entries.iter().zip(&widths) {
        match color {
            Some(c) => root.draw(&Rectangle::new([(lx, ly - 7), (lx + 16, ly + 7)], c.filled()))?,
            None => root.draw(&PathElement::new(vec![(lx, ly), (lx + 16, ly)], BLACK.stroke_width(2)))?,
        }
        root.draw_text(name, &legend_font, (lx + 22, ly))?;
        lx += wd;
    }
    Ok(())
}

/// The axes and mesh for `n` groups and a y axis up to `ymax`.
fn build_chart<'a, 'b>(area: &'a Area<'b>, n: usize, ymax: f64) -> Result<Chart<'a, 'b>, Box<dyn std::error::Error>> {
    let mut chart = ChartBuilder::on(area)
        .margin_left(20)
        .margin_right(30)
        .margin_top(44)
        .margin_bottom(8)
        .x_label_area_size(62)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_labels(8)
        .max_light_lines(1)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .y_desc("relative to direct (1.0)")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()?;
    Ok(chart)
}

/// One bar per measured value, cut at the top of the axis with a break mark.
fn draw_bars(chart: &mut Chart<'_, '_>, panel: &Panel, layout: &BarLayout) -> DrawResult {
    let BarLayout { bar_w, ymax, .. } = *layout;
    for (si, _) in panel.series.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        let bars = panel.groups.iter().enumerate().filter_map(|(gi, g)| {
            let v = (*g.values.get(si)?)?;
            let x0 = layout.x0(gi, si);
            Some(Rectangle::new([(x0 + bar_w * 0.04, 0.0), (x0 + bar_w * 0.96, v.min(ymax))], color.filled()))
        });
        chart.draw_series(bars)?;
        // Break marks on the bars the axis cuts.
        let breaks = panel.groups.iter().enumerate().filter_map(|(gi, g)| {
            let v = (*g.values.get(si)?)?;
            (v > ymax).then(|| {
                let x0 = layout.x0(gi, si);
                Rectangle::new([(x0, ymax * 0.90), (x0 + bar_w, ymax * 0.92)], WHITE.filled())
            })
        });
        chart.draw_series(breaks)?;
    }
    Ok(())
}

/// Value labels, drawn after the 1.0 line on a white patch so the line does not run through
/// them; `n/a` for a value not measured.
fn draw_value_labels(root: &Area<'_>, chart: &Chart<'_, '_>, panel: &Panel, layout: &BarLayout) -> DrawResult {
    let value_style = (FONT, 14).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
    for si in 0..panel.series.len() {
        for (gi, g) in panel.groups.iter().enumerate() {
            let xc = gi as f64 + (1.0 - layout.group_w) / 2.0 + (si as f64 + 0.5) * layout.bar_w;
            let (text, y) = match g.values.get(si).copied().flatten() {
                Some(v) => (format!("{v:.2}"), v.min(layout.ymax)),
                None => ("n/a".to_string(), 0.0),
            };
            let (px, py) = chart.backend_coord(&(xc, y));
            let half = 4 * text.chars().count() as i32 + 2;
            root.draw(&Rectangle::new([(px - half, py - 19), (px + half, py - 3)], WHITE.filled()))?;
            root.draw_text(&text, &value_style, (px, py - 3))?;
        }
    }
    Ok(())
}

/// Each group's label and sublabel under its bars.
fn draw_group_labels(root: &Area<'_>, chart: &Chart<'_, '_>, panel: &Panel) -> DrawResult {
    let label_style = (FONT, 16).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
    let sub_style = (FONT, 13).into_font().color(&RGBColor(90, 90, 90)).pos(Pos::new(HPos::Center, VPos::Top));
    for (gi, g) in panel.groups.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(gi as f64 + 0.5, 0.0));
        root.draw_text(&g.label, &label_style, (px, py + 10))?;
        root.draw_text(&g.sublabel, &sub_style, (px, py + 32))?;
    }
    Ok(())
}

/// Used by the tests and for a quick look without a bench run.
#[allow(dead_code)]
pub fn sample(path: &Path) -> Result<()> {
    let series: Vec<String> = ["pgbouncer", "splice", "pgward"].map(String::from).into();
    let g = |l: &str, s: &str, v: [f64; 3]| Group { label: l.into(), sublabel: s.into(), values: v.map(Some).into() };
    draw(
        path,
        "sample",
        &["sample subtitle".to_string()],
        &[Panel {
            title: "panel".into(),
            series,
            groups: vec![
                g("select-simple", "tps", [0.7, 0.8, 0.6]),
                g("latency-1c", "µs (inverted)", [0.9, 0.95, 0.5]),
                g("churn", "tps", [0.9, 1.0, 11.2]),
            ],
        }],
    )
    .context("sample chart")
}
