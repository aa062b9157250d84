//! A wscluster node as a child process.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::proc::{free_port, signal, strip_ansi};

/// Where a node's log lines go.
#[derive(Clone, Debug)]
pub enum NodeLog {
    /// Kept in memory (a test's nodes: printed if the test fails).
    Memory,
    /// Written to this file (long runs: the bench's nodes).
    File(PathBuf),
}

enum Sink {
    Memory(String),
    File(std::fs::File, PathBuf),
}

/// A `wscluster` node: a child process of a built binary listening on a
/// port of 127.0.0.1 chosen by the launcher, stdout and stderr captured line
/// by line (colours stripped). On drop: SIGCONT (it may have been stopped),
/// SIGKILL, reaped; its log printed first if the thread is panicking (a
/// failed test).
pub struct NodeProcess {
    pub name: String,
    child: Child,
    sink: Arc<Mutex<Sink>>,
    addr: String,
}

/// Attempts at a port before giving up (another process may take a free
/// port between its choice and the node's bind).
const PORT_ATTEMPTS: usize = 5;

impl NodeProcess {
    /// Start `bin args…` with `--listen 127.0.0.1:<a free port>` added,
    /// `NO_COLOR=1` and `env`, its log to `log`, and wait (up to `timeout`)
    /// until it answers `GET /healthz`. A node that could not bind its port
    /// (taken meanwhile) is started again on another; any other early exit
    /// is an error carrying its log.
    pub fn launch(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        log: NodeLog,
        timeout: Duration,
    ) -> Result<NodeProcess> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = format!("127.0.0.1:{}", free_port().context("free port")?);
            let mut all = vec!["--listen".to_owned(), addr.clone()];
            all.extend(args.iter().cloned());
            let mut p = Self::spawn(bin, name, &all, env, log.clone(), addr)?;
            match p.wait_healthy(timeout) {
                Ok(()) => return Ok(p),
                Err(e) if attempt < PORT_ATTEMPTS && p.lost_its_port() => {
                    drop(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        log: NodeLog,
        addr: String,
    ) -> Result<NodeProcess> {
        let sink = match log {
            NodeLog::Memory => Sink::Memory(String::new()),
            NodeLog::File(path) => Sink::File(
                std::fs::File::create(&path)
                    .with_context(|| format!("create {}", path.display()))?,
                path,
            ),
        };
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let sink = Arc::new(Mutex::new(sink));
        let pipes: Vec<Box<dyn Read + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for pipe in pipes {
            let sink = sink.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let line = strip_ansi(&line);
                    if let Ok(mut s) = sink.lock() {
                        match &mut *s {
                            Sink::Memory(text) => {
                                text.push_str(&line);
                                text.push('\n');
                            }
                            Sink::File(f, _) => {
                                let _ = writeln!(f, "{line}");
                            }
                        }
                    }
                }
            });
        }
        Ok(NodeProcess {
            name: name.to_owned(),
            child,
            sink,
            addr,
        })
    }

    /// Its listen address (`host:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Wait until it answers `/healthz` with 200; an error with its log if
    /// it exited first or did not within `timeout`.
    fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Ready once the listening socket on the port is this child's
            // (another process that took the port may answer too) and it
            // answers `/healthz`.
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_none() && listens_on(self.pid(), &self.addr) && healthz_ok(&self.addr) {
                return Ok(());
            }
            if exited.is_some() || Instant::now() > deadline {
                // The reader threads may still hold the last lines.
                std::thread::sleep(Duration::from_millis(50));
                let how = match exited {
                    Some(st) => format!("exited ({st})"),
                    None => format!("not answering /healthz after {timeout:?}"),
                };
                bail!(
                    "node {} did not start on {}: {how}:\n{}",
                    self.name,
                    self.addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// It exited because its port was taken.
    fn lost_its_port(&mut self) -> bool {
        self.try_exit().is_some() && self.log().contains("Address already in use")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send it signal `sig` (`libc::SIGSTOP`, `libc::SIGTERM`, …).
    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig);
    }

    /// SIGKILL it and reap it.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Its exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Wait (polling, without blocking the runtime) for it to exit; its
    /// status code (None: not within `timeout`, or killed by a signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        let Ok(s) = self.sink.lock() else {
            return String::new();
        };
        match &*s {
            Sink::Memory(text) => text.clone(),
            Sink::File(_, path) => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- node {} log ----\n{}", self.name, self.log());
        }
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Process `pid` holds the socket listening on `addr`'s port (Linux: the
/// LISTEN entry of `/proc/net/tcp` for the port, and one of the process's
/// descriptors naming its inode).
fn listens_on(pid: i32, addr: &str) -> bool {
    let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) else {
        return false;
    };
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit(':').next()?;
            let inode = f.get(9)?;
            (u16::from_str_radix(local_port, 16).ok()? == port && *f.get(3)? == "0A")
                .then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|l| inodes.iter().any(|i| l.to_string_lossy() == i.as_str()))
            .unwrap_or(false)
    })
}

/// `GET /healthz` on `addr` answers 200 (a short blocking check).
fn healthz_ok(addr: &str) -> bool {
    let Ok(sa) = addr.parse::<std::net::SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 16];
    let mut n = 0;
    while n < head.len() {
        match s.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    head[..n].starts_with(b"HTTP/1.1 200")
}

#[cfg(test)]
mod tests {
    use super::listens_on;

    /// The owner of a listening socket is told apart from another process
    /// (here: this test's parent), and a closed port from an open one.
    #[test]
    fn listening_socket_owner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let me = std::process::id() as i32;
        assert!(listens_on(me, &addr), "this process listens on {addr}");
        let parent = std::os::unix::process::parent_id() as i32;
        assert!(!listens_on(parent, &addr), "the parent does not");
        drop(l);
        assert!(!listens_on(me, &addr), "closed: nobody listens");
    }
}
