//! Socket settings every listener of the scheduler shares. Imports nothing
//! of the crate, so the servers (gRPC, metrics, the standby's HTTP) can all
//! use it.

/// The accepted connections of `listener`, with Nagle's algorithm off.
/// `Server::tcp_nodelay` applies only to listeners tonic binds itself, not
/// to a stream of accepted connections like this one; without it a small
/// reply can wait up to 40 ms for the peer's delayed ACK.
pub(crate) fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        nodelay(&stream);
        Ok(stream)
    })
}

/// Turns Nagle's algorithm off on an accepted connection (for the HTTP
/// servers: `axum::serve(listener.tap_io(|s| nodelay(s)), ..)`).
pub(crate) fn nodelay(stream: &tokio::net::TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::warn!(error = %err, "cannot set TCP_NODELAY on an accepted connection");
    }
}

#[cfg(test)]
mod nodelay_tests {
    use tokio_stream::StreamExt as _;

    /// What the gRPC server and the HTTP servers accept has TCP_NODELAY set
    /// (read back from the accepted socket).
    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(super::nodelay_incoming(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "the gRPC listener's connection"
        );

        use axum::serve::ListenerExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tapped = listener.tap_io(|s| super::nodelay(s));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = axum::serve::Listener::accept(&mut tapped).await;
        assert!(accepted.nodelay().unwrap(), "an HTTP listener's connection");
        // Without the tap, the default: Nagle on (what the test would catch).
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = plain.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = plain.accept().await.unwrap();
        assert!(!accepted.nodelay().unwrap());
    }
}
