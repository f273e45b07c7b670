//! systemd's notify protocol, for `Type=notify` units: readiness, status,
//! stopping and watchdog pings.

use std::path::Path;
use std::time::Duration;

use log::warn;

/// Writes one message to systemd's notify socket, if there is one
/// (`Type=notify`). The protocol is a datagram of `KEY=value` lines.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt as _;
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // Abstract socket namespace (systemd's default in containers).
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?;
        } else {
            sock.send_to(msg.as_bytes(), Path::new(&path))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        warn!("cannot notify systemd ({}): {e}", path.to_string_lossy());
    }
}

/// The watchdog ping interval systemd asks for (half its timeout).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok()
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
}
