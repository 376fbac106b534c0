//! The SVG layout's geometry (issue 16): no edge passes through the box of a node it does not
//! end at. Checked on the example's service and step graphs and on random graphs.

use crate::common;

use nixmox_core::graph::{self, Layout, NodeClass, PicNode, Picture};
use nixmox_core::plan::{self, PlanInput, Selection};

/// Points along the route as drawn: each gap's cubic curve sampled finely, each straight piece
/// as it is. Mirrors `route_path`: even hops are curves, odd hops lines.
fn polyline(route: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = vec![route[0]];
    for (i, pair) in route.windows(2).enumerate() {
        let ((x1, y1), (x2, y2)) = (pair[0], pair[1]);
        if i % 2 == 0 {
            let dy = (y2 - y1) / 2.0;
            let c = [(x1, y1), (x1, y1 + dy), (x2, y2 - dy), (x2, y2)];
            for s in 1..=64 {
                let t = s as f64 / 64.0;
                let w = [
                    (1.0 - t).powi(3),
                    3.0 * (1.0 - t).powi(2) * t,
                    3.0 * (1.0 - t) * t * t,
                    t.powi(3),
                ];
                out.push((
                    (0..4).map(|k| w[k] * c[k].0).sum(),
                    (0..4).map(|k| w[k] * c[k].1).sum(),
                ));
            }
        } else {
            out.push((x2, y2));
        }
    }
    out
}

/// Whether the segment enters the rectangle's interior (Liang–Barsky clipping).
fn crosses(p: (f64, f64), q: (f64, f64), rect: (f64, f64, f64, f64)) -> bool {
    let (x0, y0, x1, y1) = rect;
    let (dx, dy) = (q.0 - p.0, q.1 - p.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (pk, qk) in [
        (-dx, p.0 - x0),
        (dx, x1 - p.0),
        (-dy, p.1 - y0),
        (dy, y1 - p.1),
    ] {
        if pk == 0.0 {
            if qk <= 0.0 {
                return false;
            }
        } else {
            let r = qk / pk;
            if pk < 0.0 {
                t0 = t0.max(r);
            } else {
                t1 = t1.min(r);
            }
        }
    }
    t0 < t1
}

/// Every edge against every box but its own two ends; returns the offences.
fn edges_through_boxes(pic: &Picture, layout: &Layout) -> Vec<String> {
    let mut bad = Vec::new();
    // The interior, half a pixel in from the border.
    let rect = |i: usize| {
        let (x, y) = layout.xy[i];
        (
            x + 0.5,
            y + 0.5,
            x + layout.box_w - 0.5,
            y + layout.box_h - 0.5,
        )
    };
    for (k, (a, b, _)) in pic.edges.iter().enumerate() {
        let line = polyline(&layout.routes[k]);
        for i in (0..pic.nodes.len()).filter(|i| i != a && i != b) {
            if line.windows(2).any(|s| crosses(s[0], s[1], rect(i))) {
                bad.push(format!(
                    "{} -> {} crosses {}",
                    pic.nodes[*a].id, pic.nodes[*b].id, pic.nodes[i].id
                ));
            }
        }
    }
    bad
}

#[test]
fn the_checker_sees_an_edge_through_a_box() {
    assert!(crosses((0.0, 0.0), (10.0, 10.0), (4.0, 4.0, 6.0, 6.0)));
    assert!(!crosses((0.0, 0.0), (10.0, 0.0), (4.0, 4.0, 6.0, 6.0)));
    assert!(crosses((5.0, 0.0), (5.0, 10.0), (4.0, 4.0, 6.0, 6.0)));
}

/// Issue 16: postgresql's `depends_on` edge to monitoring was drawn straight through media's
/// box; no edge of the example's pictures passes through a box now.
#[test]
fn example_edges_go_around_boxes() {
    let project = common::example();
    let services = graph::services(&project);
    let layout = graph::layout(&services);
    assert_eq!(
        edges_through_boxes(&services, &layout),
        Vec::<String>::new()
    );
    let plan = plan::plan(&project, &Selection::default(), &PlanInput::default());
    let steps = graph::steps(&plan);
    let layout = graph::layout(&steps);
    assert_eq!(edges_through_boxes(&steps, &layout), Vec::<String>::new());
}

#[test]
fn random_graph_edges_go_around_boxes() {
    let mut seed: u64 = 0x1234_5678_9abc_def0;
    let mut next = move |m: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % m
    };
    let mut long_edges = 0;
    for round in 0..60 {
        let n = 2 + next(30) as usize;
        let nodes = (0..n)
            .map(|i| PicNode {
                id: format!("n{i}"),
                label: "x".repeat(1 + next(20) as usize),
                sublabel: String::new(),
                class: NodeClass::Service,
            })
            .collect();
        let mut edges = Vec::new();
        for b in 1..n {
            for _ in 0..next(4) {
                let a = next(b as u64) as usize;
                if !edges.iter().any(|(x, y, _)| (*x, *y) == (a, b)) {
                    edges.push((a, b, "db".to_string()));
                }
            }
        }
        let pic = Picture {
            title: format!("random {round}"),
            nodes,
            edges,
        };
        let layout = graph::layout(&pic);
        long_edges += layout.routes.iter().filter(|r| r.len() > 2).count();
        assert_eq!(
            edges_through_boxes(&pic, &layout),
            Vec::<String>::new(),
            "round {round}"
        );
        let svg = graph::to_svg(&pic);
        assert_eq!(svg.matches("<path class=\"edge").count(), pic.edges.len());
    }
    assert!(
        long_edges > 100,
        "the graphs had long edges to route: {long_edges}"
    );
}
