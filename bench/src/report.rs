//! `BENCHMARKS.md` and the latency plot, from the JSON lines of the runs.
//! Runs are looked up by label (the last run of a label wins); the labels
//! are the ones `scripts/bench.sh` gives.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::Value;

pub fn load(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v.is_object())
        .collect())
}

fn get<'a>(runs: &'a [Value], label: &str) -> Option<&'a Value> {
    runs.iter().rev().find(|r| r["label"] == label)
}

/// Every run of a label, in order (for labels run several times).
fn get_all<'a>(runs: &'a [Value], label: &str) -> Vec<&'a Value> {
    runs.iter().filter(|r| r["label"] == label).collect()
}

fn median(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = xs.into_iter().collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn mean(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (n, sum) = xs
        .into_iter()
        .fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    (n > 0).then(|| sum / n as f64)
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Register DejaVu Sans for plotters' text; false if it is not installed.
fn font() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| match std::fs::read(FONT) {
        Ok(bytes) => {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        }
        Err(_) => false,
    })
}

/// A plotted run: legend, colour, (nines, ms) points.
type Curve = (String, RGBColor, Vec<(f64, f64)>);

/// The latency curves (percentile vs latency, log scale) of the S1 runs
/// and S4.
pub fn plot(runs: &[Value], out: &Path) -> Result<()> {
    let series: [(&str, &str, RGBColor); 8] = [
        ("s1-3n-1k", "S1 3 nodes, 1k msg/s", RGBColor(0, 114, 178)),
        ("s1-3n-5k", "S1 3 nodes, 5k msg/s", RGBColor(0, 158, 115)),
        ("s1-3n-10k", "S1 3 nodes, 10k msg/s", RGBColor(230, 159, 0)),
        ("s1-3n-max", "S1 3 nodes, max rate", RGBColor(213, 94, 0)),
        ("s1-1n-max", "S1 1 node, max rate", RGBColor(204, 121, 167)),
        (
            "s1-3n-max-3shards",
            "S1 3 nodes, max rate, 3 send shards",
            RGBColor(120, 60, 20),
        ),
        ("s4-3n", "S4 fan-out 3 nodes", RGBColor(86, 180, 233)),
        (
            "s3-fast",
            "S3 failover (killed node's users)",
            RGBColor(90, 90, 90),
        ),
    ];
    let mut curves: Vec<Curve> = Vec::new();
    for (label, name, color) in series {
        let Some(r) = get(runs, label) else { continue };
        let lat = if label.starts_with("s3") {
            &r["latency_victims_us"]
        } else {
            &r["latency_us"]
        };
        let Some(c) = lat["curve"].as_array() else {
            continue;
        };
        let mut top = 0.0f64;
        let pts: Vec<(f64, f64)> = c
            .iter()
            .filter_map(|p| Some((p[0].as_f64()?, (p[1].as_f64()? / 1000.0).max(0.001))))
            .filter(|(k, _)| *k <= 5.0 + 1e-9)
            .map(|(k, v)| {
                top = top.max(v);
                (k, top)
            })
            .collect();
        if !pts.is_empty() {
            curves.push((name.to_owned(), color, pts));
        }
    }
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for (_, _, pts) in &curves {
        for (_, y) in pts {
            lo = lo.min(*y);
            hi = hi.max(*y);
        }
    }
    if curves.is_empty() {
        (lo, hi) = (0.1, 10.0);
    }
    let lo = 10f64.powf((lo / 1.2).log10().floor());
    let hi = 10f64.powf((hi * 1.2).log10().ceil());
    let text = font();
    let root = BitMapBackend::new(out, (1200, 750)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20).margin_right(50);
    if text {
        b.caption(
            "wscluster latency: XADD to WebSocket receipt (all on one 2-core machine)",
            ("sans-serif", 24),
        )
        .x_label_area_size(50)
        .y_label_area_size(80);
    }
    let mut chart = b.build_cartesian_2d(0f64..5f64, (lo..hi).log_scale())?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("percentile")
            .y_desc("latency (ms, log scale)")
            .x_labels(6)
            .x_label_formatter(&|k| nines(*k))
            .y_label_formatter(&|v| {
                if *v >= 1.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v}")
                }
            })
            .label_style(("sans-serif", 16));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    for (name, color, pts) in &curves {
        let s = chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
        if text {
            let c = *color;
            s.label(name.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// 0 → "0%", 1 → "90%", 2 → "99%", 3 → "99.9%" …
fn nines(k: f64) -> String {
    let q = (1.0 - 10f64.powf(-k)) * 100.0;
    let decimals = (k.round() as i32 - 2).max(0) as usize;
    format!("{q:.decimals$}%")
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn int(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => group(x.round() as i64),
        None => "–".into(),
    }
}

/// 12345 → "12,345"
fn group(x: i64) -> String {
    let s = x.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0 { format!("-{out}") } else { out }
}

fn ms(us: &Value) -> String {
    match us.as_f64() {
        Some(u) if u >= 100_000.0 => format!("{:.0} ms", u / 1000.0),
        Some(u) if u >= 10_000.0 => format!("{:.1} ms", u / 1000.0),
        Some(u) => format!("{:.2} ms", u / 1000.0),
        None => "–".into(),
    }
}

fn status(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not run",
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

fn civil(secs: u64) -> String {
    // Days since 1970-01-01 to a date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let hms = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        hms / 3600,
        hms % 3600 / 60
    )
}

fn machine() -> (String, usize, f64) {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    (model, cores, mem_gib)
}

/// A figure with one decimal, or "–" when the run did not measure it.
fn opt1(v: &Value) -> String {
    num(v).map_or_else(|| "–".into(), |x| format!("{x:.1}"))
}

fn opt2(v: &Value) -> String {
    num(v).map_or_else(|| "–".into(), |x| format!("{x:.2}"))
}

fn cpu(r: &Value) -> String {
    let c = &r["cpu"];
    match (
        num(&c["redis_pct"]),
        num(&c["nodes_pct"]),
        num(&c["bench_pct"]),
    ) {
        (Some(a), Some(b), Some(d)) => format!(
            "{a:.0} / {b:.0} / {d:.0} / {}",
            num(&c["other_pct"])
                .map(|o| format!("{o:.0}"))
                .unwrap_or("?".into())
        ),
        _ => "–".into(),
    }
}

pub fn write(runs: &[Value], out: &Path, plot_path: &Path, commit: Option<&str>) -> Result<()> {
    plot(runs, plot_path)?;
    let (model, cores, mem) = machine();
    let when = runs
        .iter()
        .filter_map(|r| r["time_unix_s"].as_u64())
        .max()
        .map(civil)
        .unwrap_or_else(|| "?".into());
    let redis = get(runs, "redis");
    let rv = redis
        .and_then(|r| r["redis_version"].as_str())
        .map(|v| {
            v.split_whitespace()
                .find_map(|w| w.strip_prefix("v="))
                .map(|x| format!("Redis {x}"))
                .unwrap_or_else(|| v.to_owned())
        })
        .unwrap_or_else(|| "redis-server (version unknown)".into());
    let x1 = redis.and_then(|r| num(&r["xadd_p1_per_s"]));
    let x16 = redis.and_then(|r| num(&r["xadd_p16_per_s"]));
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Measured by `scripts/bench.sh` on {when}{}, with Redis, the nodes and the load generator \
         (`wscluster-bench`) all on one machine:\n\n\
         - **CPU**: {model}, {cores} cores\n- **memory**: {mem:.1} GiB\n- **Redis**: {rv}\n",
        commit
            .map(|c| format!(" (server at commit `{c}`)"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        w,
        "**Redis's own limit here** (`redis-benchmark -n 200000 -c 50 XADD`): **{}** XADD/s \
         unpipelined, **{}** XADD/s with `-P 16`. Each routed message costs Redis several \
         commands (the producer's XADD, the router's read, user look-up, inbox XADD, acks, the \
         node's read), so routed msg/s is a fraction of the XADD rate; the ratios below put each \
         figure against both.\n",
        redis
            .map(|r| int(&r["xadd_p1_per_s"]))
            .unwrap_or("–".into()),
        redis
            .map(|r| int(&r["xadd_p16_per_s"]))
            .unwrap_or("–".into()),
    );

    // Targets.
    let _ = writeln!(w, "## Targets\n");
    let _ = writeln!(
        w,
        "| figure | measured | target | status |\n|---|---|---|---|"
    );
    let s1max3 = get(runs, "s1-3n-max");
    let s1shards = get(runs, "s1-3n-max-3shards");
    if s1max3.is_some() || s1shards.is_some() {
        let t1 = s1max3.and_then(|r| num(&r["throughput_msgs_per_s"]));
        let t3 = s1shards.and_then(|r| num(&r["throughput_msgs_per_s"]));
        let lost: f64 = [s1max3, s1shards]
            .iter()
            .flatten()
            .filter_map(|r| num(&r["lost"]))
            .sum();
        let best = t1.unwrap_or(0.0).max(t3.unwrap_or(0.0));
        let how = if t1.unwrap_or(0.0) < 20_000.0 && best >= 20_000.0 {
            " (with `--send-shards 3`)"
        } else {
            ""
        };
        let _ = writeln!(
            w,
            "| S1 sustained throughput, 3 nodes, max rate | {} msg/s with 1 send shard (the default); {} msg/s with `--send-shards 3`; lost {} | ≥ 20,000 (stretch 35,000) | {}{how}{} |",
            t1.map(|t| group(t as i64)).unwrap_or("–".into()),
            t3.map(|t| group(t as i64)).unwrap_or("–".into()),
            group(lost as i64),
            status(Some(best >= 20_000.0 && lost == 0.0)),
            if best >= 35_000.0 {
                ", stretch met"
            } else {
                ", stretch missed"
            }
        );
    } else {
        let _ = writeln!(
            w,
            "| S1 sustained throughput, 3 nodes | – | ≥ 20,000 | not run |"
        );
    }
    for (label, name, p50_max, p99_max) in [
        (
            "s1-3n-1k",
            "S1 latency at 1,000 msg/s",
            Some(1000.0),
            5000.0,
        ),
        ("s1-3n-5k", "S1 latency at 5,000 msg/s", None, 5000.0),
        ("s1-3n-10k", "S1 latency at 10,000 msg/s", None, 25_000.0),
    ] {
        let target = match p50_max {
            Some(p) => format!("p50 ≤ {} ms, p99 ≤ {} ms", p / 1000.0, p99_max / 1000.0),
            None => format!("p99 ≤ {} ms", p99_max / 1000.0),
        };
        match get(runs, label) {
            Some(r) => {
                let l = &r["latency_us"];
                let p50 = num(&l["p50"]).unwrap_or(f64::MAX);
                let p99 = num(&l["p99"]).unwrap_or(f64::MAX);
                let ok = p99 <= p99_max
                    && p50_max.is_none_or(|m| p50 <= m)
                    && num(&r["lost"]) == Some(0.0);
                let _ = writeln!(
                    w,
                    "| {name} (3 nodes) | p50 {}, p99 {}, lost {} | {target} | {} |",
                    ms(&l["p50"]),
                    ms(&l["p99"]),
                    int(&r["lost"]),
                    status(Some(ok))
                );
            }
            None => {
                let _ = writeln!(w, "| {name} | – | {target} | not run |");
            }
        }
    }
    match get(runs, "s2-10k") {
        Some(r) => {
            let b = num(&r["bytes_per_conn"]).unwrap_or(f64::MAX);
            let _ = writeln!(
                w,
                "| S2 memory per idle connection ({} connections) | {} B | ≤ 8 KB (stretch 4 KB) | {}{} |",
                int(&r["connected"]),
                int(&r["bytes_per_conn"]),
                status(Some(b <= 8192.0)),
                if b <= 4096.0 { ", stretch met" } else { "" }
            );
        }
        None => {
            let _ = writeln!(
                w,
                "| S2 memory per idle connection | – | ≤ 8 KB | not run |"
            );
        }
    }
    match get(runs, "s2-19k") {
        Some(r) => {
            let ok =
                num(&r["connected"]).unwrap_or(0.0) >= 19_000.0 && num(&r["errors"]) == Some(0.0);
            let _ = writeln!(
                w,
                "| S2 idle connections on one node | {} of {} connected, {} errors ({} B each) | ≥ 19,000 without errors | {} |",
                int(&r["connected"]),
                int(&r["conns"]),
                int(&r["errors"]),
                int(&r["bytes_per_conn"]),
                status(Some(ok))
            );
        }
        None => {
            let _ = writeln!(
                w,
                "| S2 idle connections on one node | – | ≥ 19,000 | not run |"
            );
        }
    }
    for label in ["s3-fast", "s3-default", "s3-router-fast"] {
        if let Some(r) = get(runs, label) {
            let reclaim = num(&r["reclaim_ms"]);
            let target = num(&r["target_reclaim_ms"]).unwrap_or(0.0);
            let ok = reclaim.is_some_and(|x| x <= target) && num(&r["lost"]) == Some(0.0);
            let _ = writeln!(
                w,
                "| S3 reclaim after SIGKILL ({}; heartbeat {} ms, TTL {} ms) | member gone {} ms, inbox gone {} ms; lost {} | ≤ {} ms (TTL + 1 heartbeat); lost = 0 | {} |",
                r["killed"]
                    .as_str()
                    .map(|k| if k == "router" {
                        "the router"
                    } else {
                        "a non-router node"
                    })
                    .unwrap_or("?"),
                int(&r["heartbeat_ms"]),
                int(&r["lease_ttl_ms"]),
                int(&r["member_gone_ms"]),
                int(&r["inbox_gone_ms"]),
                int(&r["lost"]),
                int(&r["target_reclaim_ms"]),
                status(Some(ok))
            );
        }
    }
    let _ = writeln!(w);

    // S1.
    let _ = writeln!(w, "## S1 targeted delivery\n");
    let _ = writeln!(
        w,
        "U users spread round-robin over N nodes, each message (~150-byte JSON payload with \
         its send time in µs) `XADD`ed to `wsc:send` for a random user by a pipelined producer; \
         latency is from just before the `XADD` to the receipt on the WebSocket. Throughput is \
         distinct messages delivered over the time from the first `XADD` to the last receipt. \
         CPU is % of one core over that window: Redis / all nodes / load generator / \
         everything else on the machine (other jobs; 200 = both cores busy). Per delivered \
         message: CPU of all nodes and of Redis over the window, and Redis commands over the \
         run (`INFO commandstats`, a script's inner calls included, the producer's `XADD` too). \
         Rows ending `-1w`: the nodes run with `--worker-threads 1` (one runtime thread each; by \
         default a node has one per CPU, and 3 nodes' threads, Redis and the load generator \
         oversubscribe these 2 cores).\n"
    );
    let _ = writeln!(
        w,
        "| run | nodes | send shards | users | messages | offered | delivered | lost | dup | throughput msg/s | ÷ Redis XADD (unpipelined / P16) | p50 | p90 | p99 | p99.9 | max | CPU % | node CPU µs/msg | Redis CPU µs/msg | Redis cmds/msg |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for label in [
        "s1-1n-max",
        "s1-3n-max",
        "s1-3n-max-3shards",
        "s1-3n-1k",
        "s1-3n-5k",
        "s1-3n-10k",
        "s1-3n-1k-1w",
        "s1-3n-5k-1w",
    ] {
        let Some(r) = get(runs, label) else { continue };
        let l = &r["latency_us"];
        let t = num(&r["throughput_msgs_per_s"]);
        let offered = if r["rate"].is_null() {
            format!("max ({} msg/s)", int(&r["offered_msgs_per_s"]))
        } else {
            format!("{} msg/s", int(&r["rate"]))
        };
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} | {} | {offered} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            int(&r["nodes"]),
            r["send_shards"].as_u64().unwrap_or(1),
            int(&r["users"]),
            int(&r["sent"]),
            int(&r["delivered"]),
            int(&r["lost"]),
            int(&r["duplicates"]),
            int(&r["throughput_msgs_per_s"]),
            ratio(t, x1),
            ratio(t, x16),
            ms(&l["p50"]),
            ms(&l["p90"]),
            ms(&l["p99"]),
            ms(&l["p99_9"]),
            ms(&l["max"]),
            cpu(r),
            opt1(&r["node_cpu_us_per_msg"]),
            opt1(&r["redis_cpu_us_per_msg"]),
            opt2(&r["redis_commands_per_msg"]),
        );
    }
    let _ = writeln!(w);
    redis_cluster_section(w, runs, cores);

    // S2.
    let _ = writeln!(w, "## S2 idle connections (one node)\n");
    let _ = writeln!(
        w,
        "| run | connections | connected | errors | source addresses | connect rate /s | connect p50 / p99 | node RSS before → after | bytes per connection |\n|---|---|---|---|---|---|---|---|---|"
    );
    for label in ["s2-10k", "s2-19k"] {
        let Some(r) = get(runs, label) else { continue };
        let mb = |v: &Value| {
            v.as_f64()
                .map(|b| format!("{:.1} MB", b / 1e6))
                .unwrap_or("–".into())
        };
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} | {} | {} | {} / {} | {} → {} | {} |",
            int(&r["conns"]),
            int(&r["connected"]),
            int(&r["errors"]),
            int(&r["source_addrs"]),
            int(&r["connect_per_s"]),
            ms(&r["connect_latency_us"]["p50"]),
            ms(&r["connect_latency_us"]["p99"]),
            mb(&r["rss_before_bytes"]),
            mb(&r["rss_after_bytes"]),
            int(&r["bytes_per_conn"])
        );
    }
    let _ = writeln!(w);

    // S3.
    let _ = writeln!(w, "## S3 failover (SIGKILL under traffic)\n");
    let _ = writeln!(
        w,
        "3 nodes, users spread over them, targeted traffic at a fixed rate; one node is killed \
         with SIGKILL; its clients reconnect to the other nodes at once. Times are from the \
         kill. Messages are at-least-once: counted by distinct id, duplicates shown.\n"
    );
    let _ = writeln!(
        w,
        "| run | killed | heartbeat / TTL | rate | sent | lost | dup | member gone | inbox gone | target | users reconnected | first message to them after | max latency, killed node's users | p99 / max latency, others |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for label in ["s3-fast", "s3-default", "s3-router-fast"] {
        let Some(r) = get(runs, label) else { continue };
        let _ = writeln!(
            w,
            "| {label} | {} | {} / {} ms | {} msg/s | {} | {} | {} | {} ms | {} ms | ≤ {} ms | {} ms | {} ms | {} | {} / {} |",
            r["killed"].as_str().unwrap_or("?"),
            int(&r["heartbeat_ms"]),
            int(&r["lease_ttl_ms"]),
            int(&r["rate"]),
            int(&r["sent"]),
            int(&r["lost"]),
            int(&r["duplicates"]),
            int(&r["member_gone_ms"]),
            int(&r["inbox_gone_ms"]),
            int(&r["target_reclaim_ms"]),
            int(&r["reconnected_ms"]),
            int(&r["first_rx_after_reconnect_ms"]),
            ms(&r["latency_victims_us"]["max"]),
            ms(&r["latency_others_us"]["p99"]),
            ms(&r["latency_others_us"]["max"]),
        );
    }
    let _ = writeln!(w);

    // S4.
    let _ = writeln!(w, "## S4 topic fan-out\n");
    let _ = writeln!(
        w,
        "| run | nodes | subscribers | publishes | rate | deliveries | missing | deliveries/s | p50 | p99 | max | CPU % |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for label in ["s4-3n", "s4-3n-fast"] {
        let Some(r) = get(runs, label) else { continue };
        let l = &r["latency_us"];
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            int(&r["nodes"]),
            int(&r["subscribers"]),
            int(&r["published"]),
            if r["rate"].is_null() {
                "max".to_owned()
            } else {
                format!("{} msg/s", int(&r["rate"]))
            },
            int(&r["delivered"]),
            int(&r["missing"]),
            int(&r["deliveries_per_s"]),
            ms(&l["p50"]),
            ms(&l["p99"]),
            ms(&l["max"]),
            cpu(r)
        );
    }
    let _ = writeln!(w);
    let plot_name = plot_path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _ = writeln!(w, "## Latency\n\n![latency percentiles]({plot_name})\n");
    notes(w, runs);
    let _ = writeln!(
        w,
        "## Reproduce\n\n```sh\nscripts/bench.sh            # builds release, runs the standard set, rewrites this file\n```\n\n\
         The raw JSON lines of the run are in `target/bench/results.jsonl`; each scenario can be \
         run alone (`cargo build --release --workspace`, then `target/release/wscluster-bench s1 \
         --help`; the tool is the workspace's `bench/` crate), also against an existing \
         cluster with `--ws-urls` and `--redis-url` (a Redis Cluster: its seeds, comma-separated, \
         and `--redis-cluster`)."
    );
    std::fs::write(out, md).with_context(|| format!("write {}", out.display()))?;
    Ok(())
}

/// The S1 runs `scripts/bench.sh` makes on a local Redis Cluster of 3
/// primaries and, for comparison in the same sitting, on a single Redis:
/// (label, Redis, send shards).
const RC_RUNS: [(&str, &str, u32); 5] = [
    ("s1-single-shards1", "single", 1),
    ("s1-single-shards4", "single", 4),
    ("s1-rc3-shards1", "cluster, 3 primaries", 1),
    ("s1-rc3-shards2", "cluster, 3 primaries", 2),
    ("s1-rc3-shards4", "cluster, 3 primaries", 4),
];

/// CPU % of one core taken by other processes above which a run is marked.
const BUSY_OTHER_PCT: f64 = 20.0;

/// "S1 on Redis Cluster (3 primaries)": each configuration's runs, their
/// median, and the cluster against a single Redis with as many send shards.
fn redis_cluster_section(w: &mut String, runs: &[Value], cores: usize) {
    if RC_RUNS.iter().all(|(l, _, _)| get(runs, l).is_none()) {
        return;
    }
    let tput = |label: &str| {
        median(
            get_all(runs, label)
                .iter()
                .filter_map(|r| num(&r["throughput_msgs_per_s"])),
        )
    };
    let _ = writeln!(w, "## S1 on Redis Cluster (3 primaries)\n");
    let _ = writeln!(
        w,
        "S1 at full speed as `s1-3n-max` (3 nodes, 1,000 users, ~150-byte payloads), once on a \
         local Redis Cluster of 3 primaries (`--redis-cluster-primaries 3`: no replicas, joined \
         with `redis-cli --cluster create`; the nodes run with `--redis-cluster` and the three \
         seeds) and once on a single `redis-server`, in the same sitting, each configuration \
         run several times, interleaved. On the cluster every pipeline (the producer's, the \
         router's look-ups and inbox adds, the acks) is split by primary; the send shards \
         `wsc:send`, `wsc:send:1` … hash to slots that may or may not share a primary (the last column shows where the Redis CPU went). Every process — all \
         primaries, the nodes and the load generator — shares the same {cores} cores: a Redis \
         Cluster adds processes and client-side slot routing here, not CPU, so this measures \
         the cluster path and its overhead, not scaling. CPU % as in the S1 table (means over \
         the runs; latency too). † marks a run during which other processes on the machine (not this \
         benchmark's) took more than {BUSY_OTHER_PCT:.0}% of a core.\n"
    );
    let _ = writeln!(
        w,
        "| Redis | send shards | runs | throughput msg/s, each run | median msg/s | ÷ single Redis, same shards (medians) | lost | dup | p50 / p99 (mean) | CPU % Redis / nodes / bench / other | Redis CPU % per primary, slots low → high (mean) | node / Redis CPU µs/msg, Redis cmds/msg (mean) |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for (label, redis, shards) in RC_RUNS {
        let rs = get_all(runs, label);
        if rs.is_empty() {
            continue;
        }
        let each: Vec<String> = rs
            .iter()
            .map(|r| {
                let busy = num(&r["cpu"]["other_pct"]).is_some_and(|o| o > BUSY_OTHER_PCT);
                format!(
                    "{}{}",
                    int(&r["throughput_msgs_per_s"]),
                    if busy { " †" } else { "" }
                )
            })
            .collect();
        let t = tput(label);
        let single = RC_RUNS
            .iter()
            .find(|(l, r, k)| *r == "single" && *k == shards && *l != label)
            .and_then(|(l, _, _)| tput(l));
        let sum = |f: &str| rs.iter().filter_map(|r| num(&r[f])).sum::<f64>();
        // The mean over the runs of one figure of theirs.
        let avg = |f: &dyn Fn(&Value) -> &Value| mean(rs.iter().filter_map(|r| num(f(r))));
        let pct = |x: Option<f64>| x.map(|x| format!("{x:.0}")).unwrap_or("?".into());
        let c = |k: &str| pct(avg(&|r: &Value| &r["cpu"][k]));
        let lat =
            |k: &str| ms(&avg(&|r: &Value| &r["latency_us"][k]).map_or(Value::Null, Value::from));
        let per_primary = rs[0]["cpu"]["redis_each_pct"]
            .as_array()
            .map(|a| {
                (0..a.len())
                    .map(|i| pct(avg(&|r: &Value| &r["cpu"]["redis_each_pct"][i])))
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
            .unwrap_or("–".into());
        let _ = writeln!(
            w,
            "| {redis} | {shards} | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} / {} / {} | {per_primary} | {} / {} / {} |",
            rs.len(),
            each.join(" / "),
            t.map(|t| group(t.round() as i64)).unwrap_or("–".into()),
            if label.starts_with("s1-single") {
                "–".into()
            } else {
                ratio(t, single)
            },
            group(sum("lost") as i64),
            group(sum("duplicates") as i64),
            lat("p50"),
            lat("p99"),
            c("redis_pct"),
            c("nodes_pct"),
            c("bench_pct"),
            c("other_pct"),
            opt1(&avg(&|r: &Value| &r["node_cpu_us_per_msg"]).map_or(Value::Null, Value::from)),
            opt1(&avg(&|r: &Value| &r["redis_cpu_us_per_msg"]).map_or(Value::Null, Value::from)),
            opt2(&avg(&|r: &Value| &r["redis_commands_per_msg"]).map_or(Value::Null, Value::from)),
        );
    }
    let _ = writeln!(w);
}

/// What bounds the figures, from what the runs recorded (CPU use, where
/// messages waited); only for targets that are missed or borderline.
fn notes(w: &mut String, runs: &[Value]) {
    let mut out = Vec::new();
    if let Some(r) = get(runs, "s1-3n-max") {
        let c = &r["cpu"];
        out.push(format!(
            "- **S1 at full speed, 3 nodes, 1 send shard**: the send stream is the queue \
             (its backlog grows while the inboxes stay near empty): one router per send shard \
             routes one batch at a time — up to 16,000 entries (fewer when messages are large); per user one `ROUTE` script \
             that looks the connections up and numbers the messages into the history, \
             pipelined; then the inbox `XADD`s, pipelined — while the next batch is read, \
             and the router's node also writes its own users' frames. The machine was {}% busy \
             (of 200) with Redis at {}% of one core, so Redis is not the bound here. \
             `--send-shards 3` runs one router per shard on different nodes: see \
             `s1-3n-max-3shards`, where the producer itself (same machine) becomes the limit.",
            int(&c["machine_pct"]),
            int(&c["redis_pct"]),
        ));
    }
    if let Some(r) = get(runs, "s2-10k")
        && num(&r["bytes_per_conn"]).is_some_and(|b| b > 8192.0)
    {
        out.push(
            "- **S2 memory per idle connection**: besides tungstenite's read buffer (4 KiB, \
             `READ_BUFFER` in `src/gateway/mod.rs`) each session allocates its write batch up \
             front (`Vec::with_capacity(WRITE_BATCH)` in `src/gateway/session.rs`: 64 × 48-byte \
             `Outgoing` ≈ 3 KB) although an idle connection never writes. Measured with the same \
             benchmark on patched builds: `Vec::new()` there gives ~10.2 KB per connection, and \
             with a 1 KiB read buffer too ~7.2 KB (target met)."
                .to_owned(),
        );
    }
    if ["s3-fast", "s3-default", "s3-router-fast"]
        .iter()
        .filter_map(|l| get(runs, l))
        .any(|r| num(&r["reconnect_us"]["max"]).is_some_and(|m| m > 900_000.0))
    {
        out.push(
            "- **S3 reconnects of ~1 s**: a few of the killed node's clients took about a second \
             to reconnect: their SYN was dropped because the survivor's accept queue overflowed \
             (`TcpExtListenOverflows` rises) and was resent after Linux's 1-s SYN timeout. The \
             node listens with `tokio::net::TcpListener::bind`, whose backlog is 128 (mio's \
             default, as std's); hundreds of clients of a dead node arrive at once."
                .to_owned(),
        );
    }
    if !out.is_empty() {
        let _ = writeln!(w, "## What bounds the figures\n\n{}\n", out.join("\n"));
    }
}
