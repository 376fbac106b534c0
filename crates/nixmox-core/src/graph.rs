//! Pictures of the project: the service graph or the step graph as DOT, Mermaid, or an SVG
//! drawn here (layered layout, no Graphviz needed).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::model::Project;
use crate::plan::{Action, Plan};

/// A graph to draw: nodes with a label and a style class, edges with an optional label.
/// Edges point from a prerequisite to what waits for it (providers above consumers).
#[derive(Clone, Debug, Default)]
pub struct Picture {
    pub title: String,
    pub nodes: Vec<PicNode>,
    /// (from, to, label)
    pub edges: Vec<(usize, usize, String)>,
}

#[derive(Clone, Debug)]
pub struct PicNode {
    pub id: String,
    pub label: String,
    pub sublabel: String,
    pub class: NodeClass,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeClass {
    Core,
    Service,
    StepRun,
    StepNoop,
}

/// The most nodes a picture may have: beyond this no drawing is readable, and the SVG layout's
/// cost grows faster than the graph.
pub const MAX_NODES: usize = 1_000;
/// The most edges a picture may have (a 10,000-edge SVG is a few megabytes; 2,000 services all
/// depending on each other would be two million edges and hundreds of megabytes).
pub const MAX_EDGES: usize = 10_000;

impl Picture {
    /// `Err(message)` when the picture is too large to draw in any format.
    pub fn check_size(&self) -> Result<(), String> {
        if self.nodes.len() <= MAX_NODES && self.edges.len() <= MAX_EDGES {
            return Ok(());
        }
        Err(format!(
            "the graph has {} nodes and {} edges, too large to draw (at most {MAX_NODES} nodes and {MAX_EDGES} edges)",
            self.nodes.len(),
            self.edges.len()
        ))
    }
}

/// The service graph: an edge from each provider to its consumer, labelled by kind.
pub fn services(p: &Project) -> Picture {
    let nodes = p
        .services
        .iter()
        .map(|s| PicNode {
            id: s.name.to_string(),
            label: s.name.to_string(),
            sublabel: if s.is_core() {
                s.provides
                    .iter()
                    .map(|c| c.implementation())
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                s.host.ip.to_string()
            },
            class: if s.is_core() {
                NodeClass::Core
            } else {
                NodeClass::Service
            },
        })
        .collect();
    // Merge parallel edges into one with a combined label.
    let mut merged: BTreeMap<(usize, usize), Vec<&'static str>> = BTreeMap::new();
    for e in &p.edges {
        merged
            .entry((e.to, e.from))
            .or_default()
            .push(e.kind.as_str());
    }
    let edges = merged
        .into_iter()
        .map(|((a, b), kinds)| (a, b, kinds.join(", ")))
        .collect();
    Picture {
        title: format!("{}: services", p.name),
        nodes,
        edges,
    }
}

/// The step graph of a plan.
pub fn steps(plan: &Plan) -> Picture {
    let nodes = plan
        .steps
        .iter()
        .map(|s| PicNode {
            id: s.id.to_string(),
            label: s.id.to_string(),
            sublabel: format!("{} · {}", s.action.as_str(), s.change.as_str()),
            class: if s.action == Action::Run {
                NodeClass::StepRun
            } else {
                NodeClass::StepNoop
            },
        })
        .collect();
    let mut edges = Vec::new();
    for (i, s) in plan.steps.iter().enumerate() {
        for &a in &s.after {
            edges.push((a, i, String::new()));
        }
    }
    Picture {
        title: format!("{}: steps", plan.project),
        nodes,
        edges,
    }
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

pub fn to_dot(pic: &Picture) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", dot_escape(&pic.title));
    let _ = writeln!(out, "  rankdir=TB;\n  node [shape=box, style=\"rounded,filled\", fontname=\"sans-serif\"];\n  edge [fontname=\"sans-serif\", fontsize=10];");
    for n in &pic.nodes {
        let (fill, extra) = match n.class {
            NodeClass::Core => ("#dbeafe", ", penwidth=2"),
            NodeClass::Service => ("#f3f4f6", ""),
            NodeClass::StepRun => ("#ecfdf5", ""),
            NodeClass::StepNoop => ("#ffffff", ", style=\"rounded,dashed\""),
        };
        let _ = writeln!(
            out,
            "  \"{}\" [label=\"{}\\n{}\", fillcolor=\"{fill}\"{extra}];",
            dot_escape(&n.id),
            dot_escape(&n.label),
            dot_escape(&n.sublabel)
        );
    }
    for (a, b, label) in &pic.edges {
        let (a, b) = (&pic.nodes[*a].id, &pic.nodes[*b].id);
        if label.is_empty() {
            let _ = writeln!(out, "  \"{}\" -> \"{}\";", dot_escape(a), dot_escape(b));
        } else {
            let _ = writeln!(
                out,
                "  \"{}\" -> \"{}\" [label=\"{}\"];",
                dot_escape(a),
                dot_escape(b),
                dot_escape(label)
            );
        }
    }
    out.push_str("}\n");
    out
}

pub fn to_mermaid(pic: &Picture) -> String {
    let mut out = String::from("flowchart TB\n");
    let mid = |i: usize| format!("n{i}");
    for (i, n) in pic.nodes.iter().enumerate() {
        let text = format!("{}<br/><small>{}</small>", n.label, n.sublabel).replace('"', "#quot;");
        let _ = match n.class {
            NodeClass::Core => writeln!(out, "  {}[[\"{text}\"]]", mid(i)),
            _ => writeln!(out, "  {}(\"{text}\")", mid(i)),
        };
    }
    for (a, b, label) in &pic.edges {
        if label.is_empty() {
            let _ = writeln!(out, "  {} --> {}", mid(*a), mid(*b));
        } else {
            let _ = writeln!(
                out,
                "  {} -->|{}| {}",
                mid(*a),
                label.replace('|', "/"),
                mid(*b)
            );
        }
    }
    out.push_str("  classDef core fill:#dbeafe,stroke:#1d4ed8,stroke-width:2px\n");
    let core: Vec<String> = pic
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.class == NodeClass::Core)
        .map(|(i, _)| mid(i))
        .collect();
    if !core.is_empty() {
        let _ = writeln!(out, "  class {} core", core.join(","));
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Where the SVG puts things: each node's box, and each edge as the points it passes
/// through. Public so tests can check the geometry without parsing SVG.
#[derive(Clone, Debug)]
pub struct Layout {
    pub width: f64,
    pub height: f64,
    pub box_w: f64,
    pub box_h: f64,
    /// Top-left corner of each node's box, by node index.
    pub xy: Vec<(f64, f64)>,
    /// Per edge: its source port, then a (top, bottom) pair of points for each layer it
    /// crosses, then its target port.
    pub routes: Vec<Vec<(f64, f64)>>,
}

/// Lays the picture out: nodes in layers by longest path from the sources; an edge that spans
/// several layers gets a dummy node in each layer between (Sugiyama's method), so it runs
/// through a slot of its own in those layers instead of through the boxes there. Nodes and
/// dummies are ordered within a layer by the average position of their predecessors.
pub fn layout(pic: &Picture) -> Layout {
    let n = pic.nodes.len();
    let layer = longest_path_layers(pic);
    let (vlayer, chains) = with_dummies(pic, &layer);
    let rows = ordered_rows(&vlayer, &chains);
    let layers = rows.len();
    let v = vlayer.len();
    let char_w = 7.2;
    let box_w = pic
        .nodes
        .iter()
        .map(|nd| nd.label.chars().count().max(nd.sublabel.chars().count()) as f64 * char_w + 24.0)
        .fold(120.0, f64::max);
    let (box_h, gap_x, gap_y, margin) = (46.0, 28.0, 80.0, 30.0);
    // A dummy's slot: narrow, with room on both sides to pass the boxes beside it.
    let dummy_w = 12.0;
    let slot_w = |i: usize| if i < n { box_w } else { dummy_w };
    let row_width = |row: &[usize]| -> f64 {
        row.iter().map(|&i| slot_w(i)).sum::<f64>() + row.len().saturating_sub(1) as f64 * gap_x
    };
    let widest = rows.iter().map(|r| row_width(r)).fold(box_w, f64::max);
    // At least as wide as the legend.
    let width = (margin * 2.0 + widest).max(720.0);
    let height =
        margin * 2.0 + 30.0 + layers as f64 * box_h + (layers.max(1) - 1) as f64 * gap_y + 40.0;
    let mut vxy = vec![(0f64, 0f64); v];
    for (l, row) in rows.iter().enumerate() {
        let mut x = (width - row_width(row)) / 2.0;
        for &i in row {
            vxy[i] = (x, margin + 30.0 + l as f64 * (box_h + gap_y));
            x += slot_w(i) + gap_x;
        }
    }
    let centre = |i: usize| vxy[i].0 + slot_w(i) / 2.0;
    let routes = routes(&chains, &vxy, n, box_w, box_h, &centre);
    vxy.truncate(n);
    Layout {
        width,
        height,
        box_w,
        box_h,
        xy: vxy,
        routes,
    }
}

/// Longest-path layering (nodes are acyclic; fall back to iteration order otherwise).
fn longest_path_layers(pic: &Picture) -> Vec<usize> {
    let n = pic.nodes.len();
    let mut layer = vec![0usize; n];
    for _ in 0..n.min(64) {
        let mut changed = false;
        for (a, b, _) in &pic.edges {
            if layer[*b] < layer[*a] + 1 && layer[*a] + 1 < n.max(1) {
                layer[*b] = layer[*a] + 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    layer
}

/// Vertices: the nodes, then the dummies, each with its layer; and `chains[k]`, edge k's
/// vertices, source first.
fn with_dummies(pic: &Picture, layer: &[usize]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut vlayer = layer.to_vec();
    let mut chains: Vec<Vec<usize>> = Vec::with_capacity(pic.edges.len());
    for (a, b, _) in &pic.edges {
        let mut chain = vec![*a];
        if layer[*b] > layer[*a] {
            for l in layer[*a] + 1..layer[*b] {
                chain.push(vlayer.len());
                vlayer.push(l);
            }
        }
        chain.push(*b);
        chains.push(chain);
    }
    (vlayer, chains)
}

/// The vertices of each layer, ordered by the average position of their predecessors (four
/// sweeps down the layers).
fn ordered_rows(vlayer: &[usize], chains: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let v = vlayer.len();
    let mut preds: Vec<Vec<usize>> = vec![Vec::new(); v];
    for chain in chains {
        for w in chain.windows(2) {
            preds[w[1]].push(w[0]);
        }
    }
    let layers = vlayer.iter().copied().max().map(|m| m + 1).unwrap_or(0);
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); layers];
    for (i, &l) in vlayer.iter().enumerate() {
        rows[l].push(i);
    }
    let mut pos = vec![0f64; v];
    for row in &rows {
        for (k, &i) in row.iter().enumerate() {
            pos[i] = k as f64;
        }
    }
    for _ in 0..4 {
        for row in rows.iter_mut().skip(1) {
            let key = |i: &usize| -> f64 {
                if preds[*i].is_empty() {
                    pos[*i]
                } else {
                    preds[*i].iter().map(|p| pos[*p]).sum::<f64>() / preds[*i].len() as f64
                }
            };
            let mut keyed: Vec<(f64, usize)> = row.iter().map(|i| (key(i), *i)).collect();
            keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            *row = keyed.into_iter().map(|(_, i)| i).collect();
            for (k, &i) in row.iter().enumerate() {
                pos[i] = k as f64;
            }
        }
    }
    rows
}

/// Each edge's points. Ports: each node's outgoing edges are spread along its bottom and the
/// incoming along its top, ordered by the x of the next point on the edge, so parallel edges
/// do not share a line.
fn routes(
    chains: &[Vec<usize>],
    vxy: &[(f64, f64)],
    n: usize,
    box_w: f64,
    box_h: f64,
    centre: &dyn Fn(usize) -> f64,
) -> Vec<Vec<(f64, f64)>> {
    let mut out_ports: Vec<Vec<(f64, usize)>> = vec![Vec::new(); n];
    let mut in_ports: Vec<Vec<(f64, usize)>> = vec![Vec::new(); n];
    for (k, chain) in chains.iter().enumerate() {
        out_ports[chain[0]].push((centre(chain[1]), k));
        in_ports[chain[chain.len() - 1]].push((centre(chain[chain.len() - 2]), k));
    }
    let mut src_x = vec![0f64; chains.len()];
    let mut dst_x = vec![0f64; chains.len()];
    for (ports, xs) in [(&mut out_ports, &mut src_x), (&mut in_ports, &mut dst_x)] {
        for (i, list) in ports.iter_mut().enumerate() {
            list.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let k = list.len() as f64;
            let spacing = (box_w * 0.8 / k.max(1.0)).min(14.0);
            for (j, (_, e)) in list.iter().enumerate() {
                xs[*e] = vxy[i].0 + box_w / 2.0 + (j as f64 - (k - 1.0) / 2.0) * spacing;
            }
        }
    }
    chains
        .iter()
        .enumerate()
        .map(|(k, chain)| {
            let (a, b) = (chain[0], chain[chain.len() - 1]);
            let mut points = vec![(src_x[k], vxy[a].1 + box_h)];
            for &d in &chain[1..chain.len() - 1] {
                points.push((centre(d), vxy[d].1));
                points.push((centre(d), vxy[d].1 + box_h));
            }
            points.push((dst_x[k], vxy[b].1));
            points
        })
        .collect()
}

/// An edge's route as SVG path data: a curve across each gap between layers (its control
/// points keep it inside the gap, where there are no boxes) and a straight line through each
/// layer it crosses, in its dummy's slot.
fn route_path(points: &[(f64, f64)]) -> String {
    let mut d = String::new();
    let (x0, y0) = points[0];
    let _ = write!(d, "M {x0:.1} {y0:.1}");
    for (i, pair) in points.windows(2).enumerate() {
        let ((x1, y1), (x2, y2)) = (pair[0], pair[1]);
        if i % 2 == 0 {
            let dy = (y2 - y1) / 2.0;
            let _ = write!(
                d,
                " C {x1:.1} {:.1}, {x2:.1} {:.1}, {x2:.1} {y2:.1}",
                y1 + dy,
                y2 - dy
            );
        } else {
            let _ = write!(d, " L {x2:.1} {y2:.1}");
        }
    }
    d
}

/// Draws the picture with [`layout`].
pub fn to_svg(pic: &Picture) -> String {
    let lay = layout(pic);
    let (width, height) = (lay.width, lay.height);
    let margin = MARGIN;
    let mut out = String::new();
    let _ = writeln!(out, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    let _ = writeln!(out, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\">");
    let _ = writeln!(out, "  <title>{}</title>", xml_escape(&pic.title));
    let _ = writeln!(out, "  <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#6b7280\"/></marker></defs>");
    let _ = writeln!(
        out,
        "  <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>"
    );
    let _ = writeln!(out, "  <text x=\"{margin}\" y=\"{}\" font-size=\"16\" font-weight=\"bold\" fill=\"#111827\">{}</text>", margin + 4.0, xml_escape(&pic.title));
    svg_edges(&mut out, pic, &lay.routes);
    svg_edge_labels(&mut out, pic, &lay.routes);
    svg_nodes(&mut out, pic, &lay);
    svg_legend(&mut out, pic, height);
    out.push_str("</svg>\n");
    out
}

/// The margin around the picture.
const MARGIN: f64 = 30.0;

/// An edge's colour, dash and width, by its first label.
fn edge_style(label: &str) -> (&'static str, &'static str, f64) {
    match label.split(',').next().unwrap_or("").trim() {
        "db" => ("#b45309", "", 1.6),
        "proxy" => ("#7c3aed", "", 1.6),
        "auth" => ("#047857", "", 1.6),
        "dns" => ("#9ca3af", "", 1.0),
        "depends_on" => ("#111827", " stroke-dasharray=\"5 3\"", 1.6),
        _ => ("#6b7280", "", 1.4),
    }
}

/// The edges, each along its route.
fn svg_edges(out: &mut String, pic: &Picture, routes: &[Vec<(f64, f64)>]) {
    let _ = writeln!(out, "  <g id=\"edges\" fill=\"none\">");
    for (k, (_, _, label)) in pic.edges.iter().enumerate() {
        let (colour, dash, width) = edge_style(label);
        let kind_class = label.split(',').next().unwrap_or("").trim();
        let d = route_path(&routes[k]);
        let _ = writeln!(out, "    <path class=\"edge {kind_class}\" d=\"{d}\" stroke=\"{colour}\" stroke-width=\"{width}\"{dash} marker-end=\"url(#arrow)\"/>");
    }
    let _ = writeln!(out, "  </g>");
}

/// The edges' labels, near each arrow's head.
fn svg_edge_labels(out: &mut String, pic: &Picture, routes: &[Vec<(f64, f64)>]) {
    let _ = writeln!(
        out,
        "  <g id=\"edge-labels\" font-size=\"10\" text-anchor=\"middle\">"
    );
    for (k, (_, _, label)) in pic.edges.iter().enumerate() {
        if label.is_empty() {
            continue;
        }
        // Labels sit near the arrow's head, where edges have fanned out to their targets: on
        // the last curve, into the target.
        let t = 0.78f64;
        let route = &routes[k];
        let ((x1, y1), (x2, y2)) = (route[route.len() - 2], route[route.len() - 1]);
        let dy = (y2 - y1) / 2.0;
        let pts = [(x1, y1), (x1, y1 + dy), (x2, y2 - dy), (x2, y2)];
        let c = [
            (1.0 - t).powi(3),
            3.0 * (1.0 - t).powi(2) * t,
            3.0 * (1.0 - t) * t * t,
            t.powi(3),
        ];
        let mx: f64 = (0..4).map(|i| c[i] * pts[i].0).sum();
        let my: f64 = (0..4).map(|i| c[i] * pts[i].1).sum();
        let (colour, _, _) = edge_style(label);
        let w = label.chars().count() as f64 * 6.0 + 6.0;
        let _ = writeln!(out, "    <rect x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"13\" rx=\"3\" fill=\"#ffffff\" fill-opacity=\"0.85\"/><text x=\"{mx:.1}\" y=\"{:.1}\" fill=\"{colour}\">{}</text>", mx - w / 2.0, my - 9.5, my + 0.5, xml_escape(label));
    }
    let _ = writeln!(out, "  </g>");
}

/// The boxes, styled by class.
fn svg_nodes(out: &mut String, pic: &Picture, lay: &Layout) {
    let (box_w, box_h) = (lay.box_w, lay.box_h);
    let _ = writeln!(out, "  <g id=\"nodes\">");
    for (i, nd) in pic.nodes.iter().enumerate() {
        let (x, y) = lay.xy[i];
        let (fill, stroke, sw, dash) = match nd.class {
            NodeClass::Core => ("#dbeafe", "#1d4ed8", 2.5, ""),
            NodeClass::Service => ("#f3f4f6", "#4b5563", 1.2, ""),
            NodeClass::StepRun => ("#ecfdf5", "#047857", 1.2, ""),
            NodeClass::StepNoop => ("#ffffff", "#9ca3af", 1.0, " stroke-dasharray=\"4 3\""),
        };
        let class = match nd.class {
            NodeClass::Core => "node core",
            NodeClass::Service => "node service",
            NodeClass::StepRun => "node step run",
            NodeClass::StepNoop => "node step noop",
        };
        let _ = writeln!(out, "    <g class=\"{class}\"><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{box_w:.1}\" height=\"{box_h}\" rx=\"8\" fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"{sw}\"{dash}/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"13\" font-weight=\"bold\" fill=\"#111827\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\" fill=\"#4b5563\">{}</text></g>",
            x + box_w / 2.0, y + 19.0, xml_escape(&nd.label), x + box_w / 2.0, y + 35.0, xml_escape(&nd.sublabel));
    }
    let _ = writeln!(out, "  </g>");
}

/// What the boxes and lines mean: services and edge kinds, or steps.
fn svg_legend(out: &mut String, pic: &Picture, height: f64) {
    let margin = MARGIN;
    // Legend.
    let ly = height - margin;
    let _ = writeln!(out, "  <g id=\"legend\" font-size=\"11\" fill=\"#374151\">");
    let mut lx = margin;
    if pic.nodes.iter().any(|nd| nd.class == NodeClass::Core) {
        let _ = writeln!(out, "    <rect x=\"{lx}\" y=\"{:.1}\" width=\"14\" height=\"10\" fill=\"#dbeafe\" stroke=\"#1d4ed8\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{ly:.1}\">core service</text>", ly - 9.0, lx + 20.0);
        lx += 100.0;
        let _ = writeln!(out, "    <rect x=\"{lx}\" y=\"{:.1}\" width=\"14\" height=\"10\" fill=\"#f3f4f6\" stroke=\"#4b5563\"/><text x=\"{:.1}\" y=\"{ly:.1}\">service</text>", ly - 9.0, lx + 20.0);
        lx += 70.0;
        for kind in ["db", "proxy", "auth", "dns", "depends_on"] {
            let (colour, dash, _) = edge_style(kind);
            let _ = writeln!(out, "    <line x1=\"{lx}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/><text x=\"{:.1}\" y=\"{ly:.1}\">{kind}</text>", ly - 4.0, lx + 18.0, ly - 4.0, lx + 22.0);
            lx += 34.0 + kind.len() as f64 * 6.5;
        }
        let _ = writeln!(
            out,
            "    <text x=\"{lx}\" y=\"{ly:.1}\">(arrows: provider to consumer)</text>"
        );
    } else {
        let _ = writeln!(out, "    <rect x=\"{lx}\" y=\"{:.1}\" width=\"14\" height=\"10\" fill=\"#ecfdf5\" stroke=\"#047857\"/><text x=\"{:.1}\" y=\"{ly:.1}\">step that runs</text>", ly - 9.0, lx + 20.0);
        lx += 110.0;
        let _ = writeln!(out, "    <rect x=\"{lx}\" y=\"{:.1}\" width=\"14\" height=\"10\" fill=\"#ffffff\" stroke=\"#9ca3af\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{ly:.1}\">no-op step (arrows: prerequisite to dependent)</text>", ly - 9.0, lx + 20.0);
    }
    let _ = writeln!(out, "  </g>");
}
