//! The PROXY protocol (HAProxy, v1 text and v2 binary): a load balancer
//! puts the client's real address in front of the byte stream. Only the
//! header is read; the SSH identification that follows stays in the socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt as _};

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the spec's limit).
const V1_MAX: usize = 107;
/// v2 address blocks beyond this are refused (TLVs included).
const V2_MAX: usize = 512;

/// A malformed or missing header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// The stream does not start with a PROXY header.
    #[error("the connection did not start with a PROXY protocol header")]
    Missing,
    /// A header that does not parse.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    /// The stream ended inside the header.
    #[error("the connection closed inside the PROXY protocol header")]
    Truncated,
}

fn malformed(reason: impl Into<String>) -> ProxyHeaderError {
    ProxyHeaderError::Malformed(reason.into())
}

async fn read_exact<R: AsyncRead + Unpin>(
    stream: &mut R,
    buffer: &mut [u8],
) -> Result<(), ProxyHeaderError> {
    stream
        .read_exact(buffer)
        .await
        .map(|_| ())
        .map_err(|_| ProxyHeaderError::Truncated)
}

/// Reads a v1 or v2 header. `Ok(None)`: the header says the connection is
/// the balancer's own (v2 LOCAL, v1 UNKNOWN, or a non-IP family); use the
/// socket's peer address.
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut start = [0u8; 6];
    read_exact(stream, &mut start).await?;
    if &start == b"PROXY " {
        return read_v1(stream).await;
    }
    if start[..] == V2_SIGNATURE[..6] {
        let mut rest = [0u8; 10];
        read_exact(stream, &mut rest).await?;
        if rest[..6] != V2_SIGNATURE[6..] {
            return Err(ProxyHeaderError::Missing);
        }
        return read_v2(
            stream,
            rest[6],
            rest[7],
            u16::from_be_bytes([rest[8], rest[9]]),
        )
        .await;
    }
    Err(ProxyHeaderError::Missing)
}

async fn read_v1<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // Byte by byte: nothing after the CRLF may be consumed.
    let mut line = Vec::with_capacity(V1_MAX);
    loop {
        let mut byte = [0u8; 1];
        read_exact(stream, &mut byte).await?;
        line.push(byte[0]);
        if line.ends_with(b"\r\n") {
            break;
        }
        if line.len() + 6 > V1_MAX {
            return Err(malformed("v1 line longer than 107 bytes"));
        }
    }
    let text = std::str::from_utf8(&line[..line.len() - 2]).map_err(|_| malformed("not ASCII"))?;
    parse_v1(text)
}

/// Parses the part of a v1 line after `PROXY `.
fn parse_v1(text: &str) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["UNKNOWN", ..] => Ok(None),
        [
            family @ ("TCP4" | "TCP6"),
            source,
            _destination,
            source_port,
            _destination_port,
        ] => {
            let ip: IpAddr = source
                .parse()
                .map_err(|_| malformed(format!("bad source address {source:?}")))?;
            if (*family == "TCP4") != ip.is_ipv4() {
                return Err(malformed(format!("{family} with address {source}")));
            }
            let port: u16 = source_port
                .parse()
                .map_err(|_| malformed(format!("bad source port {source_port:?}")))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(malformed(format!("unexpected v1 header {text:?}"))),
    }
}

async fn read_v2<R: AsyncRead + Unpin>(
    stream: &mut R,
    version_command: u8,
    family: u8,
    length: u16,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if version_command >> 4 != 2 {
        return Err(malformed(format!("version {}", version_command >> 4)));
    }
    let length = usize::from(length);
    if length > V2_MAX {
        return Err(malformed(format!("{length}-byte address block")));
    }
    let mut block = vec![0u8; length];
    read_exact(stream, &mut block).await?;
    parse_v2(version_command & 0x0f, family, &block)
}

fn parse_v2(command: u8, family: u8, block: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    match command {
        // LOCAL: the balancer's own health check.
        0 => return Ok(None),
        1 => {}
        other => return Err(malformed(format!("command {other}"))),
    }
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    match family {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 => {
            if block.len() < 12 {
                return Err(malformed("short IPv4 address block"));
            }
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(8))))
        }
        0x21 => {
            if block.len() < 36 {
                return Err(malformed("short IPv6 address block"));
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[..16]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port(32),
            )))
        }
        // UNSPEC, UDP, unix sockets: no client IP to report.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut reader = bytes;
        let result = read_header(&mut reader).await;
        (result, reader.to_vec())
    }

    #[tokio::test]
    async fn v1_tcp4_and_tcp6_leave_the_ssh_stream_untouched() {
        let (result, rest) =
            parse(b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 22\r\nSSH-2.0-OpenSSH_9.2\r\n").await;
        assert_eq!(result.unwrap(), Some("192.0.2.7:51000".parse().unwrap()));
        assert_eq!(rest, b"SSH-2.0-OpenSSH_9.2\r\n");
        let (result, _) = parse(b"PROXY TCP6 2001:db8::1 ::1 40000 22\r\n").await;
        assert_eq!(
            result.unwrap(),
            Some("[2001:db8::1]:40000".parse().unwrap())
        );
        let (result, _) = parse(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(result.unwrap(), None);
    }

    #[tokio::test]
    async fn v2_proxy_and_local() {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend([
            0x21, 0x11, 0, 12, 198, 51, 100, 9, 127, 0, 0, 1, 0xc3, 0x50, 0, 22,
        ]);
        header.extend(b"SSH-2.0-x\r\n");
        let (result, rest) = parse(&header).await;
        assert_eq!(result.unwrap(), Some("198.51.100.9:50000".parse().unwrap()));
        assert_eq!(rest, b"SSH-2.0-x\r\n");

        let mut header = V2_SIGNATURE.to_vec();
        header.extend([0x21, 0x21, 0, 36]);
        let mut source = [0u8; 16];
        source[0] = 0x20;
        source[1] = 0x01;
        source[15] = 5;
        header.extend(source);
        header.extend([0u8; 16]);
        header.extend([0x9c, 0x40, 0, 22]);
        let (result, _) = parse(&header).await;
        assert_eq!(result.unwrap(), Some("[2001::5]:40000".parse().unwrap()));

        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn bad_headers_are_refused_with_a_reason() {
        assert_eq!(
            parse(b"SSH-2.0-OpenSSH\r\n").await.0,
            Err(ProxyHeaderError::Missing)
        );
        assert!(matches!(
            parse(b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n").await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 ::1 ::1 1 2\r\n").await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            parse(long.as_bytes()).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4").await.0,
            Err(ProxyHeaderError::Truncated)
        );
        let mut wrong_version = V2_SIGNATURE.to_vec();
        wrong_version.extend([0x11, 0x11, 0, 0]);
        assert!(matches!(
            parse(&wrong_version).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
    }
}
