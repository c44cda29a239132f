//! Debian's Redis as the tests run it: a `redis-server` on a free loopback port, `redis-cli`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

/// A `redis-server` on a free loopback port, without persistence (tried on up to 5 ports).
pub async fn redis_server(
    dir: &Path,
    program: &Path,
    tag: &str,
) -> (std::process::Child, SocketAddr) {
    for _ in 0..5 {
        let port = super::free_port();
        let work = dir.join(tag);
        std::fs::create_dir_all(&work).expect("mkdir");
        let mut child = Command::new(program)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "local",
                "--dir",
            ])
            .arg(&work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if super::wait_listening(addr, &mut child).await {
            return (child, addr);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("redis-server did not start on any of 5 free ports");
}

/// Kills a child process on drop.
pub struct Reap(pub std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `redis-cli -h 127.0.0.1 -p PORT ARGS...` and returns its output.
pub fn redis_cli(cli: &Path, addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new(cli)
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
