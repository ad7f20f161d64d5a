//! Loopback ports for the processes tests and the e2e harness start.
//!
//! A harness often must know a component's address before it starts (other
//! components are configured with it, and a restarted component must come
//! back on the same one), so it picks the port and the component binds it
//! later. Probing with `bind(127.0.0.1:0)` and releasing lost that race: the
//! kernel hands the released port to the next `bind(0)` or outgoing
//! `connect` of any process on the machine (seen once at mesh start, and a
//! CA stopped for an outage case leaves its port free for seconds).
//!
//! [`reserve`] picks ports **outside** the kernel's ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`), which the kernel never hands
//! out by itself, and holds an exclusive lock on `<tmp>/meshid-ports/<port>`
//! for the life of the harness process, so two harness runs on one machine
//! never pick the same port. Only a process that binds that exact port by
//! number can still take it.

use std::fs::{File, TryLockError};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;

/// The locks of every port this process reserved (released at exit).
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Used when the range cannot be read.
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);

/// The kernel's ephemeral port range.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// Where the harness takes ports from: the larger of the stretches below
/// and above the ephemeral range (unprivileged ports from 10000 on).
fn candidates((lo, hi): (u16, u16)) -> Range<u16> {
    let below = 10000..lo.max(10000);
    let above = hi.saturating_add(1).max(10000)..u16::MAX;
    if below.len() >= above.len() {
        below
    } else {
        above
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("meshid-ports")
}

/// Takes `port` for this process if no other harness holds it and nothing
/// is bound to it now.
fn try_take(port: u16) -> io::Result<Option<File>> {
    let path = lock_dir().join(port.to_string());
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| at(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(e)) => return Err(at(&path, e)),
    }
    if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
        return Ok(None);
    }
    Ok(Some(file))
}

/// A loopback port no other process will be handed until this one exits:
/// outside the kernel's ephemeral range, locked against other harness runs,
/// free when picked. The component binds it next.
pub fn reserve() -> io::Result<SocketAddr> {
    reserve_run(1)
}

/// `n` consecutive ports reserved as [`reserve`] does, for a process that
/// binds more than the port it is given (a Vault/OpenBao server also
/// listens on its port + 1 for its cluster); the first is returned.
pub fn reserve_run(n: u16) -> io::Result<SocketAddr> {
    let n = n.max(1);
    let dir = lock_dir();
    std::fs::create_dir_all(&dir).map_err(|e| at(&dir, e))?;
    let range = candidates(ephemeral_range());
    let span = (range.len() as u32).saturating_sub(u32::from(n) - 1);
    if span == 0 {
        return Err(io::Error::other(
            "no loopback port outside the kernel's ephemeral range (ip_local_port_range covers 10000-65535)",
        ));
    }
    // Start somewhere different in each process, so parallel runs rarely
    // contend for the same locks.
    let start = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let mut held = HELD
        .lock()
        .map_err(|_| io::Error::other("port locks poisoned"))?;
    'candidates: for k in 0..span {
        let first = range.start + ((start.wrapping_add(k)) % span) as u16;
        let mut locks = Vec::with_capacity(usize::from(n));
        for port in first..first + n {
            match try_take(port)? {
                Some(lock) => locks.push(lock),
                // Dropping `locks` releases the ones taken so far.
                None => continue 'candidates,
            }
        }
        held.extend(locks);
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, first)));
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "no {} free consecutive loopback port(s) in {}-{}",
            n, range.start, range.end
        ),
    ))
}

/// `e` with the path it concerns in its message.
fn at(path: &std::path::Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};

    #[test]
    fn reserved_ports_are_outside_the_kernels_ephemeral_range() {
        let (lo, hi) = ephemeral_range();
        for _ in 0..20 {
            let p = reserve().unwrap().port();
            assert!(
                !(lo..=hi).contains(&p),
                "{p} is inside the ephemeral range {lo}-{hi}"
            );
        }
    }

    #[test]
    fn another_run_cannot_reserve_a_held_port() {
        let p = reserve().unwrap().port();
        // Another harness process opens the same lock file: refused.
        let other = File::open(lock_dir().join(p.to_string())).unwrap();
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
        assert_eq!(try_take(p).unwrap().map(|_| ()), None);
    }

    #[test]
    fn a_run_is_consecutive_and_every_port_of_it_is_held() {
        let first = reserve_run(3).unwrap().port();
        for p in first..first + 3 {
            assert_eq!(try_take(p).unwrap().map(|_| ()), None, "{p} is not held");
        }
    }

    #[test]
    fn the_range_is_the_larger_side_of_the_ephemeral_one() {
        assert_eq!(candidates((32768, 60999)), 10000..32768);
        assert_eq!(candidates((1024, 20000)), 20001..65535);
        assert_eq!(candidates((10000, 65535)), 10000..10000);
    }

    /// Another process asks the kernel for any port (`bind(0)`), restricted
    /// to exactly the reserved port with `IP_LOCAL_PORT_RANGE` (Linux 6.3):
    /// the worst case of the probe-then-bind race, in which it is handed
    /// our port between the probe and the component's bind. The kernel
    /// honours that restriction only inside its ephemeral range, so with a
    /// reserved port the squatter gets another one and the component still
    /// binds. (With a port probed by `bind(0)` the squatter takes it and
    /// the component's bind fails with EADDRINUSE.)
    #[test]
    fn a_process_grabbing_ports_meanwhile_does_not_get_the_reserved_one() {
        let Ok(python) = which_python() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "python3 is needed for this test in CI"
            );
            eprintln!("skipped: no python3 to play the other process");
            return;
        };
        let port = reserve().unwrap().port();
        let script = "import socket,struct,sys\n\
            p=int(sys.argv[1])\n\
            s=socket.socket()\n\
            s.setsockopt(socket.IPPROTO_IP,51,struct.pack('I',p|(p<<16)))\n\
            s.bind(('127.0.0.1',0))\n\
            s.listen()\n\
            print(s.getsockname()[1],flush=True)\n\
            sys.stdin.read()\n";
        let mut squatter = Command::new(python)
            .args(["-c", script, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(squatter.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let got: u16 = line.trim().parse().unwrap();
        // The component starts on its reserved port while the squatter holds its own.
        let bound = TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        drop(squatter.stdin.take());
        let _ = squatter.wait();
        assert_ne!(
            got, port,
            "the kernel handed the reserved port to another process"
        );
        bound.unwrap_or_else(|e| panic!("the component could not bind {port}: {e}"));
    }

    fn which_python() -> Result<PathBuf, ()> {
        let path = std::env::var_os("PATH").ok_or(())?;
        std::env::split_paths(&path)
            .map(|d| d.join("python3"))
            .find(|p| p.is_file())
            .ok_or(())
    }
}
