//! One `redis-server` process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::proc::free_port;

/// How a server listens on a port: given the port and the server's extra
/// arguments, its port arguments and the URL this process reaches it with.
pub type Listen = fn(u16, &[String]) -> (Vec<String>, String);

/// Plain TCP: `--port P`, `redis://127.0.0.1:P/`.
pub fn plain(port: u16, _extra: &[String]) -> (Vec<String>, String) {
    (
        vec!["--port".into(), port.to_string()],
        format!("redis://127.0.0.1:{port}/"),
    )
}

/// A `redis-server` on 127.0.0.1 on a free port, no persistence, its files
/// and `redis.log` in a directory the caller owns; SIGKILLed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    /// Extra server arguments (password, TLS), kept for restarts.
    extra: Vec<String>,
    listen: Listen,
}

impl RedisServer {
    /// A plain server with its files in `dir`.
    pub fn start(dir: &Path) -> Result<RedisServer> {
        Self::start_with(dir, &[], plain)
    }

    /// A server with `extra` arguments, listening as `listen` says; on a
    /// port clash, again on another port.
    pub fn start_with(dir: &Path, extra: &[String], listen: Listen) -> Result<RedisServer> {
        for _ in 0..5 {
            let mut r = RedisServer {
                port: free_port()?,
                child: None,
                dir: dir.to_owned(),
                extra: extra.to_vec(),
                listen,
            };
            if r.spawn()? {
                return Ok(r);
            }
        }
        bail!(
            "could not start redis-server with {extra:?} (see {})",
            dir.join("redis.log").display()
        )
    }

    /// Start on `self.port`; false if it did not come up (port taken).
    fn spawn(&mut self) -> Result<bool> {
        let (port_args, url) = (self.listen)(self.port, &self.extra);
        let mut cmd = Command::new("redis-server");
        cmd.args(&port_args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(&self.extra);
        self.child = launch(cmd, || ping(&url))?;
        Ok(self.child.is_some())
    }

    /// The URL this process reaches it with.
    pub fn url(&self) -> String {
        (self.listen)(self.port, &self.extra).1
    }

    /// Block (polling, up to `timeout`) until `n` clients wait in a
    /// blocking command: a reader is parked, so what is added next is
    /// served to it, not read by it afterwards.
    pub fn wait_blocked(&self, n: usize, timeout: Duration) {
        let url = self.url();
        crate::wait_until("blocked clients", timeout, || {
            let mut c = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .map_err(|e| e.to_string())?;
            let info: String = redis::cmd("INFO")
                .arg("clients")
                .query(&mut c)
                .map_err(|e| e.to_string())?;
            if info.contains(&format!("blocked_clients:{n}\r")) {
                Ok(())
            } else {
                Err(info)
            }
        });
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL it and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill it and start it again on the same port, empty (no
    /// persistence), trying for 10 s.
    pub fn restart_empty(&mut self) -> Result<()> {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn()? {
            if Instant::now() > deadline {
                bail!("redis-server did not restart on port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a server answers `PING` at `url`.
pub(crate) fn ping(url: &str) -> bool {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_ok()
}

/// Spawn `cmd` (a `redis-server`) and wait up to 5 s until `ready`: the
/// child, or None if it exited (its port was taken) or never got ready
/// (then it is killed). An error if it cannot be spawned at all.
pub(crate) fn launch(mut cmd: Command, ready: impl Fn() -> bool) -> Result<Option<Child>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start redis-server: install the redis-server package (scripts/test.sh does)")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(None);
        }
        if ready() {
            return Ok(Some(child));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(None)
}
