//! Network faults on loopback: a TCP proxy in front of every server, and a shared table of
//! which addresses may talk to which.
//!
//! Each server listens on its own loopback IP (127.0.x.y) and sends from it too, and advertises
//! its proxy's address. A proxy knows its server's IP and sees the sender's IP, so it can cut a
//! link between two servers, or isolate one server from everything (clients included). A cut
//! behaves like a partition, not a refusal: connections are accepted and then carry nothing,
//! and established ones go silent, so peers find out through their own timeouts. Healing closes
//! the silenced connections, as a long partition would end them, and peers reconnect.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Who may not talk to whom.
#[derive(Default)]
pub struct Faults {
    rules: Mutex<Rules>,
    /// Connections that a cut silenced or a blocked sender opened, to close when healing.
    silenced: Mutex<Vec<TcpStream>>,
    /// Live forwarded connections: (sender, server IP, flag that silences them, both sockets).
    live: Mutex<Vec<Link>>,
}

#[derive(Default)]
struct Rules {
    /// IPs cut off from everyone.
    isolated: HashSet<IpAddr>,
    /// Pairs of IPs that cannot reach each other (both directions).
    cut: HashSet<(IpAddr, IpAddr)>,
}

impl Rules {
    fn blocked(&self, a: IpAddr, b: IpAddr) -> bool {
        self.isolated.contains(&a)
            || self.isolated.contains(&b)
            || self.cut.contains(&(a, b))
            || self.cut.contains(&(b, a))
    }
}

struct Link {
    from: IpAddr,
    to: IpAddr,
    silent: Arc<AtomicBool>,
    sockets: [TcpStream; 2],
}

impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    /// Cuts `ip` off from every other address, clients included.
    pub fn isolate(&self, ip: IpAddr) {
        self.rules.lock().expect("faults lock").isolated.insert(ip);
        self.silence_blocked();
    }

    /// Cuts the link between `a` and `b` in both directions.
    pub fn cut(&self, a: IpAddr, b: IpAddr) {
        self.rules.lock().expect("faults lock").cut.insert((a, b));
        self.silence_blocked();
    }

    /// Removes every fault and closes the connections that went silent.
    pub fn heal(&self) {
        *self.rules.lock().expect("faults lock") = Rules::default();
        for stream in self.silenced.lock().expect("faults lock").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let mut live = self.live.lock().expect("faults lock");
        live.retain(|link| {
            if link.silent.load(Ordering::SeqCst) {
                for socket in &link.sockets {
                    let _ = socket.shutdown(Shutdown::Both);
                }
                return false;
            }
            true
        });
    }

    fn blocked(&self, from: IpAddr, to: IpAddr) -> bool {
        self.rules.lock().expect("faults lock").blocked(from, to)
    }

    fn silence_blocked(&self) {
        let rules = self.rules.lock().expect("faults lock");
        for link in self.live.lock().expect("faults lock").iter() {
            if rules.blocked(link.from, link.to) {
                link.silent.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// A proxy in front of one server: accepts on `address`, forwards to `target`.
pub struct Proxy {
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Starts forwarding from `listener` to `target` (the server's real address, whose IP is
    /// the server's identity under `faults`).
    pub fn start(listener: TcpListener, target: SocketAddr, faults: Arc<Faults>) -> std::io::Result<Proxy> {
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::Builder::new().name(format!("proxy-{address}")).spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let Ok(peer) = stream.peer_addr() else { continue };
                accept(stream, peer.ip(), target, &faults);
            }
        })?;
        Ok(Proxy { address, stop })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
    }
}

fn accept(stream: TcpStream, from: IpAddr, target: SocketAddr, faults: &Arc<Faults>) {
    let to = target.ip();
    if faults.blocked(from, to) {
        // A partition answers nothing: hold the connection open and silent.
        faults.silenced.lock().expect("faults lock").push(stream);
        return;
    }
    let Ok(upstream) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else {
        // The server is down: the sender sees the connection close, as it would see a refusal.
        return;
    };
    let _ = stream.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let silent = Arc::new(AtomicBool::new(false));
    let (Ok(a_read), Ok(a_write), Ok(b_read), Ok(b_write), Ok(a_keep), Ok(b_keep)) = (
        stream.try_clone(),
        stream.try_clone(),
        upstream.try_clone(),
        upstream.try_clone(),
        stream.try_clone(),
        upstream.try_clone(),
    ) else {
        return;
    };
    {
        let mut live = faults.live.lock().expect("faults lock");
        // Links whose pumps both ended hold the only reference left to their flag.
        live.retain(|link| Arc::strong_count(&link.silent) > 1);
        live.push(Link { from, to, silent: silent.clone(), sockets: [a_keep, b_keep] });
    }
    pump(a_read, b_write, silent.clone());
    pump(b_read, a_write, silent);
}

/// Copies bytes one way until either side closes; once `silent`, bytes are read and dropped.
fn pump(mut from: TcpStream, mut to: TcpStream, silent: Arc<AtomicBool>) {
    let _ = std::thread::Builder::new().name("proxy-pump".into()).spawn(move || {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if silent.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
