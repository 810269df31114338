//! The figures, drawn with plotters to SVG (text as `<text>`, sharp in a browser) and to PNG
//! (rasterized with the bundled DejaVu Sans subset, so no system font or fontconfig is needed):
//! the original's six-panel embedding figure, the loss curves from `log.jsonl`, and the
//! trajectories of sampled Wake tokens across snapshots.

use crate::analysis::{trajectory::TrajectoryPlot, FigureData};
use crate::run::log::LogLine;
use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::ops::Range;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

const BASE: RGBColor = RGBColor(31, 119, 180);
const WAKE: RGBColor = RGBColor(214, 39, 40);
const CROSS: RGBColor = RGBColor(44, 160, 44);
const GREY: RGBColor = RGBColor(110, 110, 110);
const TEAL: RGBColor = RGBColor(0, 150, 136);

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // the bytes are a valid font (checked by a test); nothing to do if not
            let _ = plotters::style::register_font(FAMILY, style, FONT);
        }
    });
}

fn pe<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// A figure as SVG text and PNG bytes.
pub struct Figure {
    pub svg: String,
    pub png: Vec<u8>,
}

/// A figure body, once per backend (plotters' backends are distinct types).
struct DualDraw<'a> {
    #[allow(clippy::type_complexity)]
    svg: Box<dyn Fn(&DrawingArea<SVGBackend, Shift>) -> Result<()> + 'a>,
    #[allow(clippy::type_complexity)]
    bmp: Box<dyn Fn(&DrawingArea<BitMapBackend, Shift>) -> Result<()> + 'a>,
}

fn render_dual(size: (u32, u32), d: DualDraw) -> Result<Figure> {
    register_font();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        (d.svg)(&root)?;
        root.present().map_err(pe)?;
    }
    let mut rgb = vec![255u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        (d.bmp)(&root)?;
        root.present().map_err(pe)?;
    }
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, size.0, size.1);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(&rgb)?;
    }
    Ok(Figure { svg, png })
}

/// Density histogram: `(left, right, density)` for `bins` equal bins over `[lo, hi]`.
pub fn histogram(x: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<(f64, f64, f64)> {
    let w = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for &v in x {
        if v.is_finite() && v >= lo && v <= hi {
            let b = (((v - lo) / w) as usize).min(bins - 1);
            counts[b] += 1;
        }
    }
    let n = x.len().max(1) as f64;
    counts
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            (
                lo + i as f64 * w,
                lo + (i + 1) as f64 * w,
                c as f64 / (n * w),
            )
        })
        .collect()
}

fn range_of(sets: &[&[f64]]) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for s in sets {
        for &v in s.iter() {
            if v.is_finite() {
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.02;
    (lo - pad, hi + pad)
}

/// Tick labels for an axis spanning `lo..hi`: enough decimals to tell ticks a tenth of the
/// span apart, trailing zeros dropped (one kept), never "-0.0".
fn tick_for(lo: f64, hi: f64) -> impl Fn(&f64) -> String {
    let span = (hi - lo).abs().max(1e-300);
    let decimals = (-(span / 10.0).log10()).ceil().clamp(0.0, 12.0) as usize;
    move |v: &f64| {
        let v = if v.abs() < span * 1e-9 { 0.0 } else { *v };
        let mut t = format!("{v:.decimals$}");
        while t.contains('.') && t.ends_with('0') && !t.ends_with(".0") {
            t.pop();
        }
        t
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

const TITLE: u32 = 24;
const LABEL: u32 = 16;

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Tick labels of an axis; `None` keeps plotters' own.
type Ticks<'a> = Option<&'a dyn Fn(&f64) -> String>;

/// One axis of a panel: its range, description and tick labels.
struct Axis<'a> {
    range: Range<f64>,
    desc: &'a str,
    ticks: Ticks<'a>,
}

impl<'a> Axis<'a> {
    fn new(range: Range<f64>, desc: &'a str, ticks: Ticks<'a>) -> Self {
        Self { range, desc, ticks }
    }
}

/// A panel's frame: title, axes, and where the legend goes (none when `None`).
struct Frame<'a> {
    title: &'a str,
    x: Axis<'a>,
    y: Axis<'a>,
    legend: Option<SeriesLabelPosition>,
}

/// Tick labels in whole numbers.
fn whole(v: &f64) -> String {
    format!("{v:.0}")
}

/// Tick labels in thousands (`12k`).
fn thousands(v: &f64) -> String {
    format!("{:.0}k", v / 1000.0)
}

/// Draws one panel: the titled frame with its axes on `area`, the data by `series`, then the
/// legend of the labelled series. Every chart of every figure is drawn by this function.
fn panel<'a, DB: DrawingBackend + 'a>(
    area: &'a DrawingArea<DB, Shift>,
    frame: Frame,
    series: impl FnOnce(&mut Chart<'a, DB>) -> Result<()>,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(frame.title, (FAMILY, TITLE))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(78)
        .build_cartesian_2d(frame.x.range, frame.y.range)
        .map_err(pe)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(frame.x.desc)
        .y_desc(frame.y.desc)
        .label_style((FAMILY, LABEL))
        .axis_desc_style((FAMILY, LABEL))
        .light_line_style(WHITE.mix(0.0));
    if let Some(f) = frame.x.ticks {
        mesh.x_label_formatter(f);
    }
    if let Some(f) = frame.y.ticks {
        mesh.y_label_formatter(f);
    }
    mesh.draw().map_err(pe)?;
    series(&mut chart)?;
    if let Some(position) = frame.legend {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(GREY)
            .label_font((FAMILY, LABEL))
            .position(position)
            .draw()
            .map_err(pe)?;
    }
    Ok(())
}

/// A legend entry: a filled square of `color`.
fn swatch(color: RGBColor) -> impl Fn((i32, i32)) -> Rectangle<(i32, i32)> {
    move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], color.filled())
}

/// A legend entry: a line of `color` and `width`.
fn stroke(color: RGBColor, width: u32) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(width))
}

/// `root` under a figure title of `size` pixels.
fn titled<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    size: u32,
) -> Result<DrawingArea<DB, Shift>> {
    root.titled(title, (FAMILY, size).into_font().color(&BLACK))
        .map_err(pe)
}

/// Overlaid density histograms with a legend; an empty set is skipped.
fn draw_histograms<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    sets: &[(&str, &[f64], RGBColor)],
    bins: usize,
) -> Result<()> {
    let present: Vec<&(&str, &[f64], RGBColor)> = sets.iter().filter(|s| !s.1.is_empty()).collect();
    let (lo, hi) = range_of(&present.iter().map(|s| s.1).collect::<Vec<_>>());
    let hists: Vec<Vec<(f64, f64, f64)>> = present
        .iter()
        .map(|s| histogram(s.1, lo, hi, bins))
        .collect();
    let ymax = hists
        .iter()
        .flatten()
        .map(|b| b.2)
        .fold(0.0, f64::max)
        .max(1e-12)
        * 1.12;
    let (x_ticks, y_ticks) = (tick_for(lo, hi), tick_for(0.0, ymax));
    let frame = Frame {
        title,
        x: Axis::new(lo..hi, x_desc, Some(&x_ticks)),
        y: Axis::new(0.0..ymax, "density", Some(&y_ticks)),
        legend: Some(SeriesLabelPosition::UpperRight),
    };
    panel(area, frame, |chart| {
        for (s, h) in present.iter().zip(&hists) {
            let color = s.2;
            chart
                .draw_series(
                    h.iter().map(|&(l, r, d)| {
                        Rectangle::new([(l, 0.0), (r, d)], color.mix(0.28).filled())
                    }),
                )
                .map_err(pe)?;
            let mut outline = Vec::with_capacity(2 * h.len() + 2);
            outline.push((h[0].0, 0.0));
            for &(l, r, d) in h {
                outline.push((l, d));
                outline.push((r, d));
            }
            outline.push((h[h.len() - 1].1, 0.0));
            chart
                .draw_series(LineSeries::new(outline, color.stroke_width(2)))
                .map_err(pe)?
                .label(s.0.to_string())
                .legend(swatch(color));
        }
        Ok(())
    })
}

/// A panel without a chart: its title and why there is nothing to draw.
fn draw_message<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    message: &str,
) -> Result<()> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let (w, h) = area.dim_in_pixel();
    let centre = Pos::new(HPos::Center, VPos::Top);
    area.draw(&Text::new(
        title.to_string(),
        (w as i32 / 2, 14),
        (FAMILY, TITLE).into_font().color(&BLACK).pos(centre),
    ))
    .map_err(pe)?;
    area.draw(&Text::new(
        message.to_string(),
        (w as i32 / 2, h as i32 / 2),
        (FAMILY, 20).into_font().color(&GREY).pos(centre),
    ))
    .map_err(pe)?;
    Ok(())
}

fn cumulative(r: &[f64]) -> Vec<f64> {
    let mut c = 0.0;
    r.iter()
        .map(|v| {
            c += v;
            c
        })
        .collect()
}

fn k_at(cum: &[f64], th: f64) -> usize {
    cum.iter()
        .position(|&c| c >= th)
        .map_or(cum.len(), |i| i + 1)
}

/// The embedding figure's six panels under its title.
fn six_panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    d: &FigureData,
    title: &str,
) -> Result<()> {
    let root = titled(root, title, 30)?;
    let panels = root.split_evenly((2, 3));
    norms_panel(&panels[0], d)?;
    cosines_panel(&panels[1], d)?;
    cumulative_pca_panel(&panels[2], d)?;
    drift_panel(&panels[3], d)?;
    norm_by_id_panel(&panels[4], d)?;
    top_components_panel(&panels[5], d)
}

/// Panel 1: row norms of base and Wake rows.
fn norms_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &FigureData) -> Result<()> {
    let mb = format!("base (μ = {:.3})", mean(&d.base_norms));
    let mw = format!("Wake (μ = {:.3})", mean(&d.wake_norms));
    draw_histograms(
        area,
        "Row norms",
        "L2 norm",
        &[(&mb, &d.base_norms, BASE), (&mw, &d.wake_norms, WAKE)],
        50,
    )
}

/// Panel 2: pairwise cosines within and across the groups.
fn cosines_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &FigureData) -> Result<()> {
    if d.cos_base_base.is_empty() {
        return draw_message(area, "Pairwise cosine", "no Wake rows");
    }
    draw_histograms(
        area,
        "Pairwise cosine",
        "cosine",
        &[
            ("base–base", &d.cos_base_base, BASE),
            ("Wake–Wake", &d.cos_wake_wake, WAKE),
            ("base–Wake", &d.cos_base_wake, CROSS),
        ],
        80,
    )
}

/// Panel 3: cumulative explained variance, with the 90% line.
fn cumulative_pca_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    d: &FigureData,
) -> Result<()> {
    let cb = cumulative(&d.pca_base_ratios);
    let cw = cumulative(&d.pca_wake_ratios);
    let kmax = cb.len().max(cw.len()).max(2) as f64;
    let frame = Frame {
        title: "Cumulative explained variance (PCA)",
        x: Axis::new(1.0..kmax, "components", Some(&whole)),
        y: Axis::new(0.0..1.02, "cumulative share", None),
        legend: Some(SeriesLabelPosition::LowerRight),
    };
    panel(area, frame, |chart| {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(1.0, 0.9), (kmax, 0.9)],
                8,
                6,
                GREY.stroke_width(1),
            ))
            .map_err(pe)?;
        for (name, c, color) in [("base", &cb, BASE), ("Wake", &cw, WAKE)] {
            if c.is_empty() {
                continue;
            }
            let k = k_at(c, 0.9);
            chart
                .draw_series(LineSeries::new(
                    c.iter().enumerate().map(|(i, &v)| ((i + 1) as f64, v)),
                    color.stroke_width(3),
                ))
                .map_err(pe)?
                .label(format!("{name}: 90% at k = {k}"))
                .legend(stroke(color, 3));
        }
        Ok(())
    })
}

/// Panel 4: cosine of each row to its reference row, or why there is none.
fn drift_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &FigureData) -> Result<()> {
    let title = "Drift (cosine to reference)";
    let all = d.drift_base_cos.iter().chain(&d.drift_wake_cos);
    let lo = all.clone().copied().fold(f64::INFINITY, f64::min);
    let hi = all.copied().fold(f64::NEG_INFINITY, f64::max);
    if d.drift_base_cos.is_empty() && d.drift_wake_cos.is_empty() {
        draw_message(area, title, "unavailable: no --pre snapshot")
    } else if lo > 1.0 - 1e-6 && hi < 1.0 + 1e-6 {
        draw_message(area, title, "no drift: every cosine rounds to 1.000000")
    } else {
        draw_histograms(
            area,
            title,
            "cosine(row, reference row)",
            &[
                ("base rows", &d.drift_base_cos, BASE),
                ("Wake rows", &d.drift_wake_cos, WAKE),
            ],
            80,
        )
    }
}

/// Panel 5: norm by token id (≤ 12,000 points, evenly strided, so the SVG stays small).
fn norm_by_id_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    d: &FigureData,
) -> Result<()> {
    let n = d.all_norms.len();
    let stride = n.div_ceil(12_000).max(1);
    let (lo, hi) = range_of(&[&d.all_norms]);
    let title = if stride > 1 {
        format!("Norm by token id (every {stride}th row)")
    } else {
        "Norm by token id".to_string()
    };
    let frame = Frame {
        title: &title,
        x: Axis::new(0.0..n.max(1) as f64, "token id", Some(&thousands)),
        y: Axis::new(lo..hi, "L2 norm", None),
        legend: None,
    };
    panel(area, frame, |chart| {
        let wr = d.wake_range.clone();
        chart
            .draw_series(
                d.all_norms
                    .iter()
                    .enumerate()
                    .step_by(stride)
                    .map(|(i, &v)| {
                        let c = if wr.contains(&i) { WAKE } else { BASE };
                        Circle::new((i as f64, v), 1, c.mix(0.6).filled())
                    }),
            )
            .map_err(pe)?;
        Ok(())
    })
}

/// Panel 6: explained variance of the top 20 components, base and Wake side by side.
fn top_components_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    d: &FigureData,
) -> Result<()> {
    let top = 20usize;
    let ymax = d
        .pca_base_ratios
        .iter()
        .take(top)
        .chain(d.pca_wake_ratios.iter().take(top))
        .copied()
        .fold(0.0, f64::max)
        .max(1e-6)
        * 1.12;
    let frame = Frame {
        title: "Top-20 components: explained variance",
        x: Axis::new(0.5..top as f64 + 0.5, "component", Some(&whole)),
        y: Axis::new(0.0..ymax, "share of variance", None),
        legend: Some(SeriesLabelPosition::UpperRight),
    };
    let has_wake = !d.wake_norms.is_empty();
    let sets: Vec<(&str, &Vec<f64>, RGBColor, f64)> = if has_wake {
        vec![
            ("base", &d.pca_base_ratios, BASE, -0.2),
            ("Wake", &d.pca_wake_ratios, WAKE, 0.2),
        ]
    } else {
        vec![("base", &d.pca_base_ratios, BASE, 0.0)]
    };
    let half = if has_wake { 0.19 } else { 0.35 };
    panel(area, frame, |chart| {
        for (name, r, color, off) in sets {
            chart
                .draw_series(r.iter().take(top).enumerate().map(|(i, &v)| {
                    let x = (i + 1) as f64 + off;
                    Rectangle::new([(x - half, 0.0), (x + half, v)], color.mix(0.8).filled())
                }))
                .map_err(pe)?
                .label(name.to_string())
                .legend(swatch(color));
        }
        Ok(())
    })
}

/// The six-panel embedding figure (1800 × 1000).
pub fn embedding_figure(d: &FigureData, title: &str) -> Result<Figure> {
    render_dual(
        (1800, 1000),
        DualDraw {
            svg: Box::new(|root| six_panels(root, d, title)),
            bmp: Box::new(|root| six_panels(root, d, title)),
        },
    )
}

/// `(step, value)` of the log lines of `kind` (any kind for `None`) that have a value.
fn points(
    log: &[LogLine],
    kind: Option<&str>,
    value: fn(&LogLine) -> Option<f64>,
) -> Vec<(f64, f64)> {
    log.iter()
        .filter(|l| kind.is_none_or(|k| l.kind == k))
        .filter_map(|l| value(l).map(|v| (l.step as f64, v)))
        .collect()
}

/// The loss panel, and beside it the bits-per-byte panel when the log has any.
fn loss_panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    log: &[LogLine],
    phases: &[(u64, String)],
    title: &str,
) -> Result<()> {
    let root = titled(root, title, 28)?;
    let train = points(log, Some("step"), |l| l.loss);
    let val = points(log, Some("eval"), |l| l.val_loss);
    let bpb = points(log, None, |l| l.val_bpb);
    let xmax = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    if bpb.is_empty() {
        return loss_panel(&root, &train, &val, phases, xmax);
    }
    let panels = root.split_evenly((1, 2));
    loss_panel(&panels[0], &train, &val, phases, xmax)?;
    bpb_panel(&panels[1], &bpb, phases, xmax)
}

/// A dashed vertical line where each phase after the first starts, with the phase's name.
fn phase_marks<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    phases: &[(u64, String)],
    (ylo, yhi): (f64, f64),
) -> Result<()> {
    for (i, (start, name)) in phases.iter().enumerate() {
        let x = *start as f64;
        if i > 0 {
            chart
                .draw_series(DashedLineSeries::new(
                    [(x, ylo), (x, yhi)],
                    8,
                    6,
                    GREY.stroke_width(2),
                ))
                .map_err(pe)?;
        }
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((x, yhi))
                    + Text::new(
                        name.clone(),
                        (6, 4),
                        (FAMILY, LABEL).into_font().color(&GREY),
                    ),
            ))
            .map_err(pe)?;
    }
    Ok(())
}

/// Training loss per step (dots up to 400 steps) and validation loss (squares).
fn loss_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    train: &[(f64, f64)],
    val: &[(f64, f64)],
    phases: &[(u64, String)],
    xmax: f64,
) -> Result<()> {
    let ys: Vec<f64> = train.iter().chain(val).map(|p| p.1).collect();
    let (ylo, yhi) = range_of(&[&ys]);
    let frame = Frame {
        title: "Loss (nats/token)",
        x: Axis::new(0.0..xmax, "optimizer step", Some(&whole)),
        y: Axis::new(ylo..yhi, "loss", None),
        legend: Some(SeriesLabelPosition::UpperRight),
    };
    panel(area, frame, |chart| {
        phase_marks(chart, phases, (ylo, yhi))?;
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(train.to_vec(), BASE.stroke_width(2)))
                .map_err(pe)?
                .label("train")
                .legend(stroke(BASE, 2));
            if train.len() <= 400 {
                chart
                    .draw_series(train.iter().map(|&p| Circle::new(p, 3, BASE.filled())))
                    .map_err(pe)?;
            }
        }
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.to_vec(), WAKE.stroke_width(2)))
                .map_err(pe)?
                .label("validation")
                .legend(|(x, y)| Rectangle::new([(x + 4, y - 5), (x + 14, y + 5)], WAKE.filled()));
            chart
                .draw_series(val.iter().map(|&p| {
                    EmptyElement::at(p) + Rectangle::new([(-5, -5), (5, 5)], WAKE.filled())
                }))
                .map_err(pe)?;
        }
        Ok(())
    })
}

/// Validation bits per byte.
fn bpb_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    bpb: &[(f64, f64)],
    phases: &[(u64, String)],
    xmax: f64,
) -> Result<()> {
    let (lo, hi) = range_of(&[&bpb.iter().map(|p| p.1).collect::<Vec<_>>()]);
    let frame = Frame {
        title: "Validation bits per byte",
        x: Axis::new(0.0..xmax, "optimizer step", Some(&whole)),
        y: Axis::new(lo..hi, "bits / byte", None),
        legend: None,
    };
    panel(area, frame, |chart| {
        phase_marks(chart, phases, (lo, hi))?;
        chart
            .draw_series(LineSeries::new(bpb.to_vec(), CROSS.stroke_width(2)))
            .map_err(pe)?;
        chart
            .draw_series(
                bpb.iter().map(|&p| {
                    EmptyElement::at(p) + Rectangle::new([(-5, -5), (5, 5)], CROSS.filled())
                }),
            )
            .map_err(pe)?;
        Ok(())
    })
}

/// Loss curves from `log.jsonl` (1600 × 700): train and validation loss, validation bits/byte;
/// `phases` (first step, name) of chained logs are marked where each starts.
pub fn loss_figure(log: &[LogLine], phases: &[(u64, String)], title: &str) -> Result<Figure> {
    render_dual(
        (1600, 700),
        DualDraw {
            svg: Box::new(|root| loss_panels(root, log, phases, title)),
            bmp: Box::new(|root| loss_panels(root, log, phases, title)),
        },
    )
}

/// Named curves on one panel of `size` pixels (1200 × 700 for a page of its own), one colour
/// each: e.g. the validation bits per byte of each scheme of an init study.
pub fn curves_figure(
    series: &[(String, Vec<(f64, f64)>)],
    title: &str,
    descs: (&str, &str),
    size: (u32, u32),
) -> Result<Figure> {
    render_dual(
        size,
        DualDraw {
            svg: Box::new(|root| curves_panel(root, series, title, descs)),
            bmp: Box::new(|root| curves_panel(root, series, title, descs)),
        },
    )
}

fn curves_panel<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    series: &[(String, Vec<(f64, f64)>)],
    title: &str,
    (x_desc, y_desc): (&str, &str),
) -> Result<()> {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .collect();
    let xmax = xs.iter().copied().fold(1.0, f64::max);
    let (lo, hi) = range_of(&[&ys]);
    let frame = Frame {
        title,
        x: Axis::new(0.0..xmax, x_desc, Some(&whole)),
        y: Axis::new(lo..hi, y_desc, None),
        legend: Some(SeriesLabelPosition::UpperRight),
    };
    panel(root, frame, |chart| {
        for (i, (name, pts)) in series.iter().enumerate() {
            let c = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))
                .map_err(pe)?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(3)));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 5, c.filled())))
                .map_err(pe)?;
        }
        Ok(())
    })
}

/// The token paths, and beside them the mean displacement by step.
fn trajectory_panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    t: &TrajectoryPlot,
    by_step: &[(u64, f64)],
    title: &str,
) -> Result<()> {
    let root = titled(root, title, 28)?;
    let (left, right) = root.split_horizontally(1000);
    paths_panel(&left, t)?;
    displacement_panel(&right, by_step)
}

/// Each token's path in the plane of the last snapshot's first two components, its first and
/// last positions, and the words of the 12 tokens that moved furthest in that plane.
fn paths_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    t: &TrajectoryPlot,
) -> Result<()> {
    let xs: Vec<f64> = t.coords.iter().flatten().map(|p| p.0).collect();
    let ys: Vec<f64> = t.coords.iter().flatten().map(|p| p.1).collect();
    let (x0, x1) = range_of(&[&xs]);
    let (y0, y1) = range_of(&[&ys]);
    let (x_ticks, y_ticks) = (tick_for(x0, x1), tick_for(y0, y1));
    let title = format!(
        "{} Wake tokens over {} snapshots (PCA of the last)",
        t.words.len(),
        t.steps.len()
    );
    let frame = Frame {
        title: &title,
        x: Axis::new(x0..x1, "PC 1", Some(&x_ticks)),
        y: Axis::new(y0..y1, "PC 2", Some(&y_ticks)),
        legend: Some(SeriesLabelPosition::UpperRight),
    };
    panel(area, frame, |chart| {
        let n_tok = t.words.len();
        for k in 0..n_tok {
            let path: Vec<(f64, f64)> = t.coords.iter().map(|f| f[k]).collect();
            chart
                .draw_series(LineSeries::new(path, TEAL.mix(0.35).stroke_width(1)))
                .map_err(pe)?;
        }
        let first = &t.coords[0];
        let last = &t.coords[t.coords.len() - 1];
        chart
            .draw_series(
                first
                    .iter()
                    .map(|&p| Circle::new(p, 3, GREY.mix(0.7).stroke_width(1))),
            )
            .map_err(pe)?
            .label(format!("step {}", t.steps[0]))
            .legend(|(x, y)| Circle::new((x + 9, y), 4, GREY.stroke_width(1)));
        chart
            .draw_series(last.iter().map(|&p| Circle::new(p, 3, TEAL.filled())))
            .map_err(pe)?
            .label(format!("step {}", t.steps[t.steps.len() - 1]))
            .legend(|(x, y)| Circle::new((x + 9, y), 4, TEAL.filled()));
        let mut order: Vec<usize> = (0..n_tok).collect();
        let dist =
            |k: usize| ((first[k].0 - last[k].0).powi(2) + (first[k].1 - last[k].1).powi(2)).sqrt();
        order.sort_by(|&a, &b| dist(b).total_cmp(&dist(a)));
        for &k in order.iter().take(12) {
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at(last[k])
                        + Text::new(
                            t.words[k].trim().to_string(),
                            (7, -16),
                            (FAMILY, 14).into_font().color(&BLACK),
                        ),
                ))
                .map_err(pe)?;
        }
        Ok(())
    })
}

/// Mean full-space distance of the sampled tokens from the first snapshot, by step.
fn displacement_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    by_step: &[(u64, f64)],
) -> Result<()> {
    let xmax = by_step.iter().map(|p| p.0 as f64).fold(1.0, f64::max);
    let ymax = by_step.iter().map(|p| p.1).fold(1e-9, f64::max) * 1.1;
    let frame = Frame {
        title: "Mean distance from first snapshot",
        x: Axis::new(0.0..xmax, "step", Some(&whole)),
        y: Axis::new(0.0..ymax, "L2 (full space)", None),
        legend: None,
    };
    let pts: Vec<(f64, f64)> = by_step.iter().map(|&(s, v)| (s as f64, v)).collect();
    panel(area, frame, |chart| {
        chart
            .draw_series(LineSeries::new(pts.clone(), TEAL.stroke_width(2)))
            .map_err(pe)?;
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, TEAL.filled())))
            .map_err(pe)?;
        Ok(())
    })
}

/// Trajectories of sampled Wake tokens (1600 × 800).
pub fn trajectory_figure(
    t: &TrajectoryPlot,
    by_step: &[(u64, f64)],
    title: &str,
) -> Result<Figure> {
    render_dual(
        (1600, 800),
        DualDraw {
            svg: Box::new(|root| trajectory_panels(root, t, by_step, title)),
            bmp: Box::new(|root| trajectory_panels(root, t, by_step, title)),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_font_loads() {
        assert!(ab_glyph_font_ok());
    }

    fn ab_glyph_font_ok() -> bool {
        plotters::style::register_font("test-family", FontStyle::Normal, FONT).is_ok()
    }

    #[test]
    fn tick_labels_follow_the_span_and_are_never_negative_zero() {
        let t = tick_for(-0.6, 1.0);
        assert_eq!(t(&-1e-17), "0.0");
        assert_eq!(t(&0.4), "0.4");
        assert_eq!(t(&-0.2), "-0.2");
        assert_eq!(tick_for(0.0, 8.0)(&6.0), "6.0");
        // large spans: whole numbers, zeros kept
        assert_eq!(tick_for(0.0, 3500.0)(&3000.0), "3000");
        // drift of base rows lives in 0.99990..1.0: ticks must differ
        let d = tick_for(0.9999, 1.0);
        assert_eq!(d(&0.99992), "0.99992");
        assert_ne!(d(&0.99992), d(&0.99994));
    }

    #[test]
    fn histogram_is_a_density() {
        let x: Vec<f64> = (0..1000).map(|i| i as f64 / 1000.0).collect();
        let h = histogram(&x, 0.0, 1.0, 10);
        let area: f64 = h.iter().map(|(l, r, d)| (r - l) * d).sum();
        assert!((area - 1.0).abs() < 1e-12);
        assert!(h.iter().all(|b| (b.2 - 1.0).abs() <= 0.011), "{h:?}");
    }

    #[test]
    fn chained_logs_mark_where_each_phase_starts() {
        let line = |kind: &str, step: u64, v: f64| LogLine {
            kind: kind.into(),
            phase: None,
            step,
            loss: (kind == "step").then_some(v),
            lr: None,
            val_loss: (kind == "eval").then_some(v),
            val_bpb: (kind == "eval").then_some(v / 2.0),
            train_loss: None,
            elapsed_s: None,
        };
        let log: Vec<LogLine> = (1..=20)
            .map(|s| line("step", s, 5.0 - s as f64 * 0.1))
            .chain([line("eval", 10, 4.0), line("eval", 20, 3.5)])
            .collect();
        let phases = vec![(0, "p1".to_string()), (10, "p2-lora".to_string())];
        let f = loss_figure(&log, &phases, "test").unwrap();
        assert!(f.png.starts_with(&[0x89, b'P', b'N', b'G']));
        // the labels of both panels, and a dashed line (one per panel) at the second phase
        assert_eq!(f.svg.matches("\np2-lora\n").count(), 2);
        assert_eq!(f.svg.matches("\np1\n").count(), 2);
        let plain = loss_figure(&log, &[], "test").unwrap();
        assert!(!plain.svg.contains("p2-lora"));
        assert!(f.svg.len() > plain.svg.len());
    }

    #[test]
    fn six_panel_figure_renders_png_and_svg() {
        let d = FigureData {
            base_norms: vec![1.0, 1.1, 0.9, 1.05],
            wake_norms: vec![1.5, 1.6, 1.4],
            all_norms: vec![1.0, 1.1, 0.9, 1.05, 1.5, 1.6, 1.4],
            wake_range: 4..7,
            cos_base_base: vec![0.1, 0.2, 0.0],
            cos_wake_wake: vec![0.3, 0.35, 0.25],
            cos_base_wake: vec![0.05, 0.1],
            pca_base_ratios: vec![0.6, 0.3, 0.1],
            pca_wake_ratios: vec![0.5, 0.5],
            drift_base_cos: vec![],
            drift_wake_cos: vec![0.99, 0.98],
            collapsed: vec![],
        };
        let f = embedding_figure(&d, "test").unwrap();
        assert!(f.png.starts_with(&[0x89, b'P', b'N', b'G']));
        assert!(f.svg.contains("<svg") && f.svg.contains("Row norms"));
        assert!(f.svg.contains("Wake (μ = 1.500)"));
    }
}
