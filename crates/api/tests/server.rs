//! The bounded HTTP server against raw sockets on a loopback port 0:
//! slowloris, idle keep-alive, the connection cap and oversized bodies.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use taskexec_api::server::{ServerConfig, serve};

/// Starts the server on its own runtime thread; returns its address.
fn start(config: ServerConfig) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            let router = Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .route(
                    "/upload",
                    post(|body: axum::body::Bytes| async move { body.len().to_string() }),
                )
                .layer(DefaultBodyLimit::max(1024));
            serve(listener, router, config, std::future::pending()).await;
        });
    });
    rx.recv().expect("address")
}

fn config(max: usize, reserved: usize) -> ServerConfig {
    ServerConfig {
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(1),
        max_connections: max,
        reserved_connections: reserved,
    }
}

/// Sends `request` and reads until the server closes or 10 s pass.
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request).expect("write");
    let mut out = Vec::new();
    let mut buf = [0_u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"ok") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn healthz_answers_under_a_slowloris_attack() {
    let addr = start(config(64, 4));
    // Hundreds of connections that send part of a head and never finish.
    let mut held = Vec::new();
    for _ in 0..300 {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
            held.push(s);
        }
    }
    // The reserved slots' short header timeout frees them for a probe.
    std::thread::sleep(Duration::from_millis(1500));
    let answer = exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
}

#[test]
fn a_full_server_refuses_with_503_and_retry_after() {
    let addr = start(config(3, 1));
    let held: Vec<_> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET").expect("write");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let answer = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    drop(held);
}

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let addr = start(config(16, 1));
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0_u8; 4096];
    let n = s.read(&mut buf).expect("answer");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Nothing more is sent: the server closes (EOF), within the read timeout.
    let n = s.read(&mut buf).expect("EOF, not a read timeout");
    assert_eq!(n, 0);
}

#[test]
fn a_client_that_sends_a_whole_oversized_body_reads_its_413() {
    let addr = start(config(16, 1));
    let mut s = TcpStream::connect(addr).expect("connect");
    let body = vec![b'a'; 32 << 20];
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("head");
    // Like Python's urllib: the whole body before reading anything.
    s.write_all(&body)
        .expect("the whole body is taken, not reset");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("the answer, not a reset");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}
