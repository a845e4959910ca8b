//! The daemon under test: started as a child process on a free loopback port, timed until
//! `/health/ready` answers 200, its resident memory read from /proc, stopped with SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::net::TcpStream;

use crate::client::{read, write_all};

/// How to start csgd.
#[derive(Debug, Clone)]
pub struct Spec {
    pub csgd: PathBuf,
    pub model_name: String,
    pub model_path: PathBuf,
    pub ort_library: PathBuf,
    /// `--provider` flags, in order.
    pub providers: Vec<String>,
    /// Extra `--set KEY=VALUE` overrides.
    pub sets: Vec<String>,
}

/// USER_HZ, the unit of /proc's CPU times: 100 on every Linux architecture csgd builds for.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    /// From spawning the process to the first 200 of /health/ready.
    pub ready_after: Duration,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Daemon {
    pub async fn start(spec: &Spec) -> Result<Daemon> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut cmd = Command::new(&spec.csgd);
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--model")
            .arg(format!("{}={}", spec.model_name, spec.model_path.display()))
            .arg("--ort-library")
            .arg(&spec.ort_library)
            .arg("--log-level")
            .arg("warn");
        for p in &spec.providers {
            cmd.arg("--provider").arg(p);
        }
        for set in &spec.sets {
            cmd.arg("--set").arg(set);
        }
        // Its log goes to a file: polling /health/ready logs each 503 until it is ready.
        let log = std::env::temp_dir().join(format!("csgd-bench-{}.log", addr.port()));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdout(Stdio::null()).stderr(log_file);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", spec.csgd.display()))?;
        loop {
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("csgd exited before it was ready ({status}):\n{text}");
            }
            if get_status(addr, "/health/ready").await.ok() == Some(200) {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                bail!("csgd was not ready within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(Daemon {
            ready_after: started.elapsed(),
            child,
            addr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident and peak resident memory in MiB (VmRSS, VmHWM).
    pub fn memory_mib(&self) -> Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> Result<f64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc/PID/status"))?;
            let kib: f64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("unreadable {line:?}"))?;
            Ok(kib / 1024.0)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// CPU time the daemon has used so far (user + system, all threads), in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // The command name (field 2) is in parentheses and may hold spaces; count after it.
        let (_, rest) = stat.rsplit_once(')').context("unreadable /proc/PID/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of proc(5); `fields[0]` is field 3.
        let ticks = |field: usize| -> Result<f64> {
            fields
                .get(field - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("field {field} of /proc/PID/stat"))
        };
        Ok((ticks(14)? + ticks(15)?) / CLOCK_TICKS_PER_SECOND)
    }

    /// SIGTERM, then wait (SIGKILL after 10 s).
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Totals of the `csgd_batch_size` histogram (sum of batch sizes, number of batches) over
    /// every model, from /metrics: their differences around a run give its mean batch size.
    pub fn batch_totals(&self) -> Result<(f64, f64)> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let text = agent
            .get(format!("http://{}/metrics", self.addr))
            .call()?
            .body_mut()
            .read_to_string()?;
        let total = |metric: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(metric))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        Ok((total("csgd_batch_size_sum"), total("csgd_batch_size_count")))
    }
}

/// One GET on a fresh connection; the status code.
async fn get_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let s = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    write_all(&s, request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 256];
    while head.len() < 12 {
        let n = read(&s, &mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the status line");
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let text = std::str::from_utf8(&head[..12])?;
    text.get(9..12)
        .and_then(|c| c.parse().ok())
        .context("status line")
}
