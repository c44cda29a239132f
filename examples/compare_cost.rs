//! What comparing versions costs the gateway (`routes[].compare`), for tests/bench: CPU per
//! copy compared, and memory with 100,000 distinct endpoints, against the configured bounds.
//!
//! Each copy is compared by the gateway's own [`RouteCompare`] (`compare_now`: the work a
//! compare route's thread does per copy) on this one thread: a candidate, a primary and a
//! secondary answer a JSON document; the secondary differs from the primary in an id and a
//! time (noise) and the candidate, for half the copies, in a price too (a regression).
//!
//! Memory is measured first, while the process holds nothing else: RSS growth is what the
//! comparison's store kept. Usage: `compare_cost [--quick]`. Prints markdown lines for
//! results.md; exits 1 if a bound did not hold.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::Value;

use teeway_gateway::compare::{RouteCompare, OTHER_ENDPOINTS, SAMPLE_BYTES};
use teeway_gateway::config::{compare_config, CompareConfig};
use teeway_gateway::metrics::GatewayMetrics;
use teeway_gateway::replay::Answer;
use teeway_wire::{Meta, MirroredRequest, ResponseOrigin, ResponseRecord};

const URLS: [&str; 3] = ["http://v2", "http://v1", "http://v1b"];

fn config(max_endpoints: u64) -> CompareConfig {
    let text = format!(
        "{{ candidate: {}, primary: {}, secondary: {}, max_endpoints: {max_endpoints} }}",
        URLS[0], URLS[1], URLS[2]
    );
    let block = teeway_runtime::yaml::parse(&text).expect("valid YAML");
    compare_config(&block, &URLS).expect("a valid compare block")
}

fn request(path: &str) -> Arc<MirroredRequest> {
    Arc::new(MirroredRequest {
        meta: Meta::basic(1, UNIX_EPOCH, "bench".into()),
        method: http::Method::GET,
        uri: path.parse().expect("a path"),
        version: http::Version::HTTP_11,
        headers: HeaderMap::new(),
        body: Bytes::new(),
        trailers: None,
        body_truncated: false,
        production: None,
    })
}

/// An order of `items` items: about 75 bytes each.
fn document(items: usize, id: u64, price: u64) -> Bytes {
    let items: Vec<Value> = (0..items)
        .map(|i| {
            serde_json::json!({"sku": format!("sku-{i}"), "name": format!("item {i}"), "qty": i % 7, "price": price})
        })
        .collect();
    let doc = serde_json::json!({
        "request_id": format!("{id:032x}"),
        "at": format!("2026-11-26T16:{:02}:{:02}Z", id % 60, (id / 60) % 60),
        "customer": {"id": 42, "tier": "gold"},
        "items": items,
    });
    Bytes::from(doc.to_string())
}

fn answer(body: Bytes) -> Option<Answer> {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Some(Answer {
        status: StatusCode::OK,
        elapsed: Duration::from_millis(1),
        response: Some(Box::new(ResponseRecord {
            meta: Meta::basic(1, UNIX_EPOCH, "bench".into()),
            origin: ResponseOrigin::Replayed,
            target: String::new(),
            latency: Duration::from_millis(1),
            status: StatusCode::OK,
            version: http::Version::HTTP_11,
            headers,
            body,
            body_truncated: false,
        })),
        grpc_status: None,
    })
}

/// Three answers to copy `i`: the candidate prices every other copy wrong.
fn answers(items: usize, i: u64) -> Vec<Option<Answer>> {
    let wrong = if i.is_multiple_of(2) { 11 } else { 10 };
    vec![
        answer(document(items, i * 3, wrong)),
        answer(document(items, i * 3 + 1, 10)),
        answer(document(items, i * 3 + 2, 10)),
    ]
}

/// This process's user and system CPU time.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15: 11 and 12 here. Clock ticks are 100 a second on
    // Linux for every architecture this runs on.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// `VmRSS` and `VmHWM`, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// A path segment of letters for `i`: no identifier to fold, so each is its own endpoint.
fn word(mut i: u64) -> String {
    let mut w = String::new();
    loop {
        w.push(char::from(b'a' + (i % 26) as u8));
        i /= 26;
        if i == 0 {
            return w;
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut ok = true;
    let endpoints: u64 = if quick { 10_000 } else { 100_000 };
    println!("| distinct endpoints | max_endpoints | named | counted as `(other endpoints)` | samples kept | sample bytes (bound {} MiB) | RSS growth MiB: first tenth of the copies, the other nine tenths | peak RSS MiB |", SAMPLE_BYTES >> 20);
    println!("|---:|---:|---:|---:|---:|---:|---|---:|");
    for max_endpoints in [200u64, 10_000] {
        let metrics = Arc::new(GatewayMetrics::new());
        let urls = URLS.map(String::from);
        let compare = RouteCompare::build("bench", &config(max_endpoints), &urls, None, &metrics);
        let (before, _) = memory();
        let mut tenth = before;
        for i in 0..endpoints {
            if i == endpoints / 10 {
                tenth = memory().0;
            }
            // Every copy differs (the candidate's price), so every endpoint keeps samples.
            let mut answers = answers(20, 0);
            answers[0] = answer(document(20, i * 3, 11));
            compare.compare_now(request(&format!("/{}/items", word(i))), answers);
        }
        let (after, peak) = memory();
        let summary = compare.summary();
        let listed = summary["endpoints"].as_array().cloned().unwrap_or_default();
        let named = listed
            .iter()
            .filter(|e| e["endpoint"] != OTHER_ENDPOINTS)
            .count() as u64;
        let other = listed
            .iter()
            .find(|e| e["endpoint"] == OTHER_ENDPOINTS)
            .and_then(|e| e["compared"].as_u64())
            .unwrap_or(0);
        let sample_bytes = summary["sample_bytes"].as_u64().unwrap_or(0);
        let samples: u64 = listed
            .iter()
            .flat_map(|e| e["fields"].as_array().cloned().unwrap_or_default())
            .map(|f| f["samples"].as_u64().unwrap_or(0))
            .sum();
        ok &= named <= max_endpoints && named + other.min(1) > 0 && sample_bytes <= SAMPLE_BYTES;
        ok &= named + other == endpoints || named == endpoints.min(max_endpoints);
        // Once the bounds are reached, the store keeps no more whatever comes.
        ok &= after - tenth < 8.0;
        println!(
            "| {endpoints} | {max_endpoints} | {named} | {other} copies | {samples} | {:.1} MiB | {:+.1}, {:+.1} | {peak:.1} |",
            sample_bytes as f64 / (1024.0 * 1024.0),
            tenth - before,
            after - tenth
        );
    }
    println!();

    println!("| answers compared | copies | CPU µs per copy | copies/s on one core | differing |");
    println!("|---|---:|---:|---:|---:|");
    for (items, copies) in [(20usize, 20_000u64), (800, 2_000)] {
        let copies = if quick { copies / 10 } else { copies };
        let metrics = Arc::new(GatewayMetrics::new());
        let urls = URLS.map(String::from);
        let compare = RouteCompare::build("bench", &config(200), &urls, None, &metrics);
        // Made before the clock starts: what is timed is the comparison alone.
        let work: Vec<(Arc<MirroredRequest>, Vec<Option<Answer>>)> = (0..copies)
            .map(|i| (request(&format!("/orders/{i}")), answers(items, i)))
            .collect();
        let size = work[0].1[0]
            .as_ref()
            .and_then(|a| a.response.as_ref())
            .map_or(0, |r| r.body.len());
        let (cpu0, wall0) = (cpu(), Instant::now());
        for (record, answers) in work {
            compare.compare_now(record, answers);
        }
        let (spent, wall) = (cpu() - cpu0, wall0.elapsed());
        let summary = compare.summary();
        let differing = summary["endpoints"][0]["differing"].as_u64().unwrap_or(0);
        ok &= differing == copies / 2;
        let per = spent.as_secs_f64() * 1e6 / copies as f64;
        println!(
            "| 3 JSON answers of {:.1} KiB ({items} items) | {copies} | {per:.1} | {:.0} | {differing} |",
            size as f64 / 1024.0,
            copies as f64 / wall.as_secs_f64()
        );
    }
    if !ok {
        eprintln!("a bound did not hold");
        std::process::exit(1);
    }
}
