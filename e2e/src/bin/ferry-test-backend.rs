//! A NodePort stand-in for the network-namespace tests, run inside a node's namespace: it
//! answers each HTTP request and UDP datagram with the node's name and the client address it
//! saw (taken from a PROXY v2 header when one comes first), so a test can tell which node
//! served it and whether the client's address survived. `/stream` sends a line every 10 ms
//! until the connection ends; `/hold` answers once and then neither writes nor closes.
//!
//! `ferry-test-backend --name NODE [--address IP] [--tcp PORT]… [--udp PORT]… [--health PORT]`
//!
//! `--address` binds the TCP and UDP ports to one address (a pod's, behind NodePort NAT)
//! instead of every address of the node, IPv4 and IPv6 (a client's IPv4 address is reported
//! as such, not IPv4-mapped).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ferry_forwarder::proxy_protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

#[derive(Default)]
struct Args {
    name: String,
    address: Option<IpAddr>,
    tcp: Vec<u16>,
    udp: Vec<u16>,
    health: Option<u16>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let port = || {
            value
                .parse::<u16>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--name" => args.name = value.clone(),
            "--address" => {
                args.address = Some(value.parse().map_err(|e| format!("{flag} {value}: {e}"))?)
            }
            "--tcp" => args.tcp.push(port()?),
            "--udp" => args.udp.push(port()?),
            "--health" => args.health = Some(port()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.name.is_empty() {
        return Err("--name is required".into());
    }
    Ok(args)
}

fn response(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn serve_tcp(mut stream: TcpStream, peer: SocketAddr, name: String) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut client = peer;
    loop {
        // Read up to the end of a request head.
        let end = loop {
            if let Some((c, _, len)) = proxy_protocol::parse(&buf) {
                client = c;
                buf.drain(..len);
            }
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        match path.as_str() {
            "/stream" => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                    .await?;
                loop {
                    stream.write_all(format!("{name}\n").as_bytes()).await?;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            "/hold" => {
                stream
                    .write_all(
                        response(&format!("{name} {}\n", client.ip().to_canonical())).as_bytes(),
                    )
                    .await?;
                // Keep the socket open whatever the client does.
                let mut sink = [0u8; 1024];
                while stream.read(&mut sink).await? > 0 {}
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return Ok(());
            }
            _ => {
                stream
                    .write_all(
                        response(&format!("{name} {}\n", client.ip().to_canonical())).as_bytes(),
                    )
                    .await?
            }
        }
    }
}

async fn tcp(address: IpAddr, port: u16, name: String) -> std::io::Result<()> {
    let listener = TcpListener::bind((address, port)).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let _ = serve_tcp(stream, peer, name).await;
        });
    }
}

async fn udp(address: IpAddr, port: u16, name: String) -> std::io::Result<()> {
    let socket = UdpSocket::bind((address, port)).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let (_, peer) = socket.recv_from(&mut buf).await?;
        let _ = socket
            .send_to(
                format!("{name} {}\n", peer.ip().to_canonical()).as_bytes(),
                peer,
            )
            .await;
    }
}

async fn health(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(response("ok\n").as_bytes()).await;
        });
    }
}

#[tokio::main]
async fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let _ = ferry_forwarder::raise_open_files_limit();
    let address = args.address.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    let mut tasks = tokio::task::JoinSet::new();
    for port in args.tcp {
        tasks.spawn(tcp(address, port, args.name.clone()));
    }
    for port in args.udp {
        tasks.spawn(udp(address, port, args.name.clone()));
    }
    if let Some(port) = args.health {
        tasks.spawn(health(port));
    }
    if let Some(Ok(Err(err))) = tasks.join_next().await {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
