//! `ferry explain`'s text: one screen, sections in the order a user asks the questions
//! (whose is it, what address, which node announces it, what went wrong), columns aligned.

use std::fmt::Write;

use super::explanation::Explanation;

/// Rows as columns padded to the widest cell, two spaces apart, each line indented.
fn table(out: &mut String, indent: &str, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::from(indent);
        for (i, cell) in row.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn or_dash(s: Option<&str>) -> String {
    s.map(str::to_string).unwrap_or_else(|| "-".into())
}

pub fn render(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Service   {}", e.service);
    let _ = writeln!(out, "Owner     {}", e.ownership.summary);
    let a = &e.allocation;
    let requested = if a.requested.is_empty() {
        "any address".to_string()
    } else {
        a.requested
            .iter()
            .map(|r| format!("{} ({})", r.ip, r.source))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "Requested {requested}{}{}",
        a.requested_pool
            .as_ref()
            .map(|p| format!(", pool {p}"))
            .unwrap_or_default(),
        a.sharing_key
            .as_ref()
            .map(|k| format!(", sharing key {k:?}"))
            .unwrap_or_default()
    );
    if a.given.is_empty() {
        let _ = writeln!(out, "Given     none");
    } else {
        let rows: Vec<Vec<String>> = a
            .given
            .iter()
            .map(|g| {
                vec![
                    g.address.clone(),
                    format!("ipMode {}", or_dash(g.ip_mode.as_deref())),
                    format!("pool {}", or_dash(g.pool.as_deref())),
                ]
            })
            .collect();
        out.push_str("Given\n");
        table(&mut out, "  ", &rows);
    }
    if a.given.is_empty() && !a.candidate_pools.is_empty() {
        out.push_str("Pools\n");
        let rows: Vec<Vec<String>> = a
            .candidate_pools
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.addresses.join(","),
                    match (p.available, p.total) {
                        (Some(av), Some(t)) => format!("{av} of {t} free"),
                        _ => "no status yet".into(),
                    },
                    if p.valid { "valid" } else { "invalid" }.into(),
                ]
            })
            .collect();
        table(&mut out, "  ", &rows);
    }
    let _ = writeln!(out, "Traffic   externalTrafficPolicy {}", e.traffic_policy);

    out.push_str("Ports\n");
    let rows: Vec<Vec<String>> = e
        .ports
        .iter()
        .map(|p| {
            vec![
                or_dash(p.name.as_deref()),
                format!("{}/{}", p.port, p.protocol),
                p.node_port
                    .map(|n| format!("nodePort {n}"))
                    .unwrap_or_else(|| "no nodePort".into()),
                if p.errors.is_empty() {
                    String::new()
                } else {
                    format!("error: {}", p.errors.join("; "))
                },
            ]
        })
        .collect();
    table(&mut out, "  ", &rows);

    out.push_str("Nodes (forwarder freshness by this machine's clock)\n");
    let rows: Vec<Vec<String>> = e
        .nodes
        .iter()
        .map(|n| {
            let mut row = vec![
                n.name.clone(),
                n.ineligible
                    .as_ref()
                    .map(|w| format!("ineligible: {w}"))
                    .unwrap_or_else(|| "eligible".into()),
                match (n.forwarder.alive, n.forwarder.renewed_seconds_ago) {
                    (true, Some(age)) => format!("forwarder alive (renewed {age}s ago)"),
                    (false, Some(age)) => format!("forwarder DEAD (renewed {age}s ago)"),
                    (_, None) => "no forwarder heartbeat".into(),
                },
            ];
            if let Some(ready) = n.ready_endpoints {
                row.push(
                    if ready {
                        "ready endpoints"
                    } else {
                        "no ready endpoints"
                    }
                    .into(),
                );
            }
            if !n.forwarder.refused.is_empty() {
                row.push(format!("refuses {}", n.forwarder.refused.join(",")));
            }
            row
        })
        .collect();
    table(&mut out, "  ", &rows);

    for v in &e.vips {
        let _ = writeln!(
            out,
            "VIP {}  served by {}{}",
            v.address,
            v.served_by,
            if v.shared_with.is_empty() {
                String::new()
            } else {
                format!(", shared with {}", v.shared_with.join(", "))
            }
        );
        if v.served_by == "ferry forwarder" {
            let _ = writeln!(out, "  owner: {}", or_dash(v.owner.as_deref()));
            let rows: Vec<Vec<String>> = v
                .standings
                .iter()
                .enumerate()
                .map(|(i, s)| vec![format!("{}.", i + 1), s.node.clone(), s.standing.clone()])
                .collect();
            table(&mut out, "  ", &rows);
        }
    }

    if !e.conditions.is_empty() {
        out.push_str("Conditions\n");
        let rows: Vec<Vec<String>> = e
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                ]
            })
            .collect();
        table(&mut out, "  ", &rows);
    }
    if !e.events.is_empty() {
        out.push_str("Events (newest last)\n");
        let rows: Vec<Vec<String>> = e
            .events
            .iter()
            .map(|ev| {
                vec![
                    or_dash(ev.time.as_deref()),
                    ev.type_.clone(),
                    ev.reason.clone(),
                    if ev.count > 1 {
                        format!("(x{}) {}", ev.count, ev.message)
                    } else {
                        ev.message.clone()
                    },
                ]
            })
            .collect();
        table(&mut out, "  ", &rows);
    }
    if e.problems.is_empty() {
        out.push_str("Verdict   no problem found\n");
    } else {
        out.push_str("Problems\n");
        for p in &e.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out.trim_end().to_string()
}
