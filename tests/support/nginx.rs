//! Debian's nginx as a real peer: a primary, a mirroring ingress, a baseline in benchmarks.
//!
//! [`Nginx::start`] writes a configuration around the `http {}` contents a test gives (with
//! `{port}` standing for a free loopback port), runs nginx in the foreground, single process, and
//! waits until it accepts connections.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running nginx; killed on drop.
pub struct Nginx {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// Runs `program` with `http {}` contents `http` (in which `{port}` becomes the port it
    /// listens on), keeping its files in `dir`. Panics, with nginx's error log, if it does not
    /// start within the tests' limit.
    pub async fn start(program: &Path, dir: &Path, http: &str) -> Nginx {
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = super::free_port();
            let temp = dir.join("temp");
            std::fs::create_dir_all(&temp).expect("temp dir");
            let conf = format!(
                "daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{http}
}}
",
                dir = dir.display(),
                temp = temp.display(),
                http = http.replace("{port}", &port.to_string()),
            );
            let conf_path = dir.join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let mut child = Command::new(program)
                .arg("-p")
                .arg(dir)
                // Before it reads the configuration nginx opens its default error log, which
                // needs root: name one it can write.
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn nginx");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            if super::wait_listening(addr, &mut child).await {
                return Nginx { child, addr };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_error = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            // Only a port taken in the meantime is worth another try.
            if !last_error.contains("Address already in use") {
                break;
            }
        }
        panic!("nginx did not start: {last_error}");
    }
}

/// Runs `h2load` with `args` (ended after 180 s by coreutils' `timeout`, so a stalled stream
/// fails the test instead of hanging it) and returns (succeeded, failed, errored, 5xx).
pub fn h2load(program: &Path, args: &[&str]) -> (u64, u64, u64, u64) {
    let out = Command::new("timeout")
        .arg("180")
        .arg(program)
        .args(args)
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_ne!(
        out.status.code(),
        Some(124),
        "h2load ran over 180 s:\n{text}"
    );
    let number_before = |line: &str, word: &str| -> u64 {
        let words: Vec<&str> = line.split_whitespace().collect();
        words
            .iter()
            .position(|w| w.trim_end_matches(',') == word)
            .and_then(|i| words.get(i.wrapping_sub(1)))
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no summary in h2load's output:\n{text}"));
    let statuses = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_else(|| panic!("no status codes in h2load's output:\n{text}"));
    (
        number_before(requests, "succeeded"),
        number_before(requests, "failed"),
        number_before(requests, "errored"),
        number_before(statuses, "5xx"),
    )
}
