//! The sink protocol, the lab's proof of delivery over TCP: the initiator writes exactly N
//! payload bytes and shuts down its write side; the responder counts to EOF, answers the count
//! as 8 bytes big-endian and closes; the initiator checks the count is N.
use std::{
    io::{self, Read as _, Write},
    net::{Shutdown, SocketAddrV4, TcpStream},
};

use anyhow::{Context as _, ensure};

use super::traffic::Report;

/// The initiator: `connections` connections to `to`, `bytes` payload bytes each.
pub(super) fn client(to: SocketAddrV4, connections: u32, bytes: u64) -> Report {
    let mut report = Report::new(to);
    for attempt in 1..=connections {
        if let Some(mut stream) = report.connect(attempt, to)
            && let Err(error) = send(&mut stream, bytes, &mut report.payload_bytes)
        {
            report.transfer_failed(attempt, error);
        }
    }
    report
}

/// One sink exchange on a connected stream; `written` grows by every payload byte written.
pub(super) fn send(stream: &mut TcpStream, bytes: u64, written: &mut u64) -> anyhow::Result<()> {
    write_payload(stream, bytes, written).context("writing the payload")?;
    stream
        .shutdown(Shutdown::Write)
        .context("shutting down the write side")?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .context("reading the responder's count")?;
    let counted = u64::from_be_bytes(count);
    ensure!(
        counted == bytes,
        "the responder counted {counted} of the {bytes} bytes sent"
    );
    Ok(())
}

/// The responder: counts the bytes to EOF and answers the count. Returns the count.
pub(super) fn receive(stream: &mut TcpStream) -> io::Result<u64> {
    let count = io::copy(stream, &mut io::sink())?;
    stream.write_all(&count.to_be_bytes())?;
    Ok(count)
}

/// Writes `bytes` bytes of a fixed pattern, counting them into `written` as they go.
pub(super) fn write_payload(out: &mut impl Write, bytes: u64, written: &mut u64) -> io::Result<()> {
    let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let chunk = &pattern[..pattern.len().min(left as usize)];
        out.write_all(chunk)?;
        *written += chunk.len() as u64;
        left -= chunk.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, TcpListener},
        thread,
    };

    use super::*;

    /// A listener on a free loopback port (no privileges needed).
    fn loopback() -> (TcpListener, SocketAddrV4) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let std::net::SocketAddr::V4(address) = listener.local_addr().unwrap() else {
            unreachable!("bound to an IPv4 address")
        };
        (listener, address)
    }

    /// A loopback responder answering each connection with `answer`.
    fn responder(answer: fn(&mut TcpStream)) -> SocketAddrV4 {
        let (listener, address) = loopback();
        thread::spawn(move || {
            for stream in listener.incoming() {
                answer(&mut stream.unwrap());
            }
        });
        address
    }

    #[test]
    fn a_sink_exchange_proves_every_byte_was_delivered() {
        let to = responder(|stream| {
            receive(stream).unwrap();
        });
        let report = client(to, 3, 200_003);
        assert_eq!((report.connections, report.connected), (3, 3));
        assert_eq!(report.payload_bytes, 3 * 200_003);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    #[test]
    fn an_empty_exchange_counts_zero() {
        let to = responder(|stream| {
            receive(stream).unwrap();
        });
        let report = client(to, 1, 0);
        assert_eq!((report.connected, report.payload_bytes), (1, 0));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    #[test]
    fn a_short_count_is_an_error() {
        let to = responder(|stream| {
            let count = io::copy(stream, &mut io::sink()).unwrap();
            stream.write_all(&(count - 1).to_be_bytes()).unwrap();
        });
        let report = client(to, 1, 1000);
        assert_eq!(report.connected, 1);
        assert!(
            report.errors[0].contains("counted 999 of the 1000 bytes"),
            "{:?}",
            report.errors
        );
    }

    #[test]
    fn a_closed_port_is_refused() {
        let (listener, to) = loopback();
        drop(listener);
        let report = client(to, 2, 10);
        assert_eq!(
            (report.connections, report.connected, report.refused),
            (2, 0, 2)
        );
        assert_eq!(report.payload_bytes, 0);
    }
}
