//! A long-haul link for the benchmark's WAN scenarios: relays UDP and TCP on one loopback port
//! to a gateway with a fixed delay each way and UDP loss (see `tests/support/wan.rs`).
//!
//! ```text
//! cargo run --release --example wan_relay -- <upstream addr> <one-way delay ms> <loss fraction>
//! ```
//!
//! Prints `listening <port>`, then takes commands on stdin, one per line: `cut`, `restore`,
//! `block-udp`, `unblock-udp`, `loss <fraction>`, `delay <ms>`, `stats`. Ends at the end of stdin.

#[allow(dead_code)] // the tests use all of it
#[path = "../tests/support/wan.rs"]
mod wan;

use std::io::BufRead;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [upstream, delay_ms, loss] = args.as_slice() else {
        anyhow::bail!("usage: wan_relay <upstream addr> <one-way delay ms> <loss fraction>");
    };
    let upstream: std::net::SocketAddr = upstream.parse()?;
    let delay = Duration::from_millis(delay_ms.parse()?);
    let loss: f64 = loss.parse()?;
    // The relay runs on its own thread's runtime while this thread reads commands.
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => return drop(started_tx.send(Err(e))),
        };
        runtime.block_on(async move {
            match wan::Wan::start(upstream, delay, loss).await {
                Ok(wan) => {
                    let _ = started_tx.send(Ok((wan.addr, wan.faults.clone())));
                    std::future::pending::<()>().await;
                }
                Err(e) => drop(started_tx.send(Err(e))),
            }
        });
    });
    let (addr, faults) = started_rx.recv()??;
    println!("listening {}", addr.port());
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("cut"), None) => faults.cut(true),
            (Some("restore"), None) => faults.cut(false),
            (Some("block-udp"), None) => faults.block_udp(true),
            (Some("unblock-udp"), None) => faults.block_udp(false),
            (Some("loss"), Some(v)) => faults.set_loss(v.parse()?),
            (Some("delay"), Some(v)) => faults.set_delay(Duration::from_millis(v.parse()?)),
            (Some("stats"), None) => println!(
                "forwarded {} dropped {}",
                faults.forwarded.load(std::sync::atomic::Ordering::Relaxed),
                faults.dropped.load(std::sync::atomic::Ordering::Relaxed)
            ),
            _ => eprintln!("unknown command: {line}"),
        }
        println!("ok");
    }
    Ok(())
}
