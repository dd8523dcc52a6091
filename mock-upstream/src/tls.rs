//! TLS for the mock: HTTPS with HTTP/2 and HTTP/1.1 chosen by ALPN, from PEM files
//! ([`acceptor`], [`serve_tls`]), and what tests need around it: a throwaway certificate
//! authority that issues server certificates ([`TestCa`]) and a client connection that trusts it
//! and offers the protocols a test chooses ([`connect`]).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    AlpnError, Ssl, SslAcceptor, SslConnector, SslFiletype, SslMethod, select_next_proto,
};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509, X509NameBuilder};
use tokio::net::{TcpListener, TcpStream};
use tokio_openssl::SslStream;
use tower::Service;

use crate::MockState;

/// `h2` then `http/1.1`, in ALPN's wire format: the server's order of preference.
const ALPN_H2_H1: &[u8] = b"\x02h2\x08http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    File { path: PathBuf, source: ErrorStack },
    #[error("TLS: {0}")]
    Ssl(#[from] ErrorStack),
    #[error("TLS handshake: {0}")]
    Handshake(#[from] openssl::ssl::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A server-side TLS configuration from a PEM certificate chain and key, offering HTTP/2 and
/// HTTP/1.1 by ALPN. Errors name the file at fault.
pub fn acceptor(cert: &Path, key: &Path) -> Result<SslAcceptor, TlsError> {
    let file = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::File { path, source }
    };
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
    b.set_certificate_chain_file(cert).map_err(file(cert))?;
    b.set_private_key_file(key, SslFiletype::PEM)
        .map_err(file(key))?;
    b.check_private_key().map_err(file(key))?;
    b.set_alpn_select_callback(|_, offered| {
        // A client that offers neither gets no ALPN and speaks HTTP/1.1.
        select_next_proto(ALPN_H2_H1, offered).ok_or(AlpnError::NOACK)
    });
    Ok(b.build())
}

/// Serve the mock over TLS on an already bound listener: HTTP/2 or HTTP/1.1, whichever the
/// client negotiated. Returns only when accepting fails for good.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: SslAcceptor,
    state: Arc<MockState>,
) -> io::Result<()> {
    let app = crate::app(state);
    let acceptor = Arc::new(acceptor);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like: nothing to wait on but time.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // See `serve`: small SSE frames must not wait in Nagle's buffer.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("could not set TCP_NODELAY: {e}");
        }
        let app = app.clone();
        let acceptor = Arc::clone(&acceptor);
        tokio::spawn(async move {
            let stream = match handshake(&acceptor, tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
            };
            // What `into_make_service_with_connect_info` gives plain connections, so requests are
            // counted per connection the same way.
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().call(request)
                });
            let served = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn handshake(
    acceptor: &SslAcceptor,
    tcp: TcpStream,
) -> Result<SslStream<TcpStream>, TlsError> {
    let mut stream = SslStream::new(Ssl::new(acceptor.context())?, tcp)?;
    Pin::new(&mut stream).accept().await?;
    Ok(stream)
}

/// A TLS connection to `addr` that trusts `ca_pem`, verifies the name `localhost` and offers the
/// ALPN protocols `alpn` (e.g. `["h2", "http/1.1"]`; empty: none). The stream tells what was
/// negotiated (`ssl().selected_alpn_protocol()`) and which certificate was served
/// (`ssl().peer_certificate()`).
pub async fn connect(
    addr: SocketAddr,
    ca_pem: &[u8],
    alpn: &[&str],
) -> Result<SslStream<TcpStream>, TlsError> {
    let mut b = SslConnector::builder(SslMethod::tls())?;
    b.cert_store_mut().add_cert(X509::from_pem(ca_pem)?)?;
    if !alpn.is_empty() {
        let mut wire = Vec::new();
        for p in alpn {
            // Protocol names are a handful of bytes; a longer one is a caller's bug.
            wire.push(u8::try_from(p.len()).unwrap_or(u8::MAX));
            wire.extend_from_slice(p.as_bytes());
        }
        b.set_alpn_protos(&wire)?;
    }
    let ssl = b.build().configure()?.into_ssl("localhost")?;
    let mut stream = SslStream::new(ssl, TcpStream::connect(addr).await?)?;
    Pin::new(&mut stream).connect().await?;
    Ok(stream)
}

/// A certificate authority made up for one test run.
pub struct TestCa {
    cert: X509,
    key: PKey<Private>,
}

impl TestCa {
    pub fn new() -> Result<TestCa, TlsError> {
        let key = new_key()?;
        let serial = random_serial()?;
        let name = name("tollgate test CA")?;
        let mut b = X509::builder()?;
        b.set_version(2)?;
        b.set_serial_number(&serial)?;
        b.set_subject_name(&name)?;
        b.set_issuer_name(&name)?;
        b.set_pubkey(&key)?;
        b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
        b.set_not_after(&*Asn1Time::days_from_now(2)?)?;
        b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        b.append_extension(KeyUsage::new().critical().key_cert_sign().build()?)?;
        b.sign(&key, MessageDigest::sha256())?;
        Ok(TestCa {
            cert: b.build(),
            key,
        })
    }

    /// The CA's certificate, for clients to trust.
    pub fn cert_pem(&self) -> Result<Vec<u8>, TlsError> {
        Ok(self.cert.to_pem()?)
    }

    /// A server certificate for `localhost` and `127.0.0.1` signed by this CA, and its key:
    /// `(certificate PEM, private key PEM)`. Each call makes a new key and serial number.
    pub fn issue(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let key = new_key()?;
        let serial = random_serial()?;
        let subject = name("localhost")?;
        let mut b = X509::builder()?;
        b.set_version(2)?;
        b.set_serial_number(&serial)?;
        b.set_subject_name(&subject)?;
        b.set_issuer_name(self.cert.subject_name())?;
        b.set_pubkey(&key)?;
        b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
        b.set_not_after(&*Asn1Time::days_from_now(1)?)?;
        b.append_extension(BasicConstraints::new().build()?)?;
        b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
        b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
        let san = SubjectAlternativeName::new()
            .dns("localhost")
            .ip("127.0.0.1")
            .build(&b.x509v3_context(Some(&self.cert), None))?;
        b.append_extension(san)?;
        b.sign(&self.key, MessageDigest::sha256())?;
        Ok((b.build().to_pem()?, key.private_key_to_pem_pkcs8()?))
    }
}

fn new_key() -> Result<PKey<Private>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

fn random_serial() -> Result<openssl::asn1::Asn1Integer, ErrorStack> {
    let mut n = BigNum::new()?;
    n.rand(63, MsbOption::MAYBE_ZERO, false)?;
    n.to_asn1_integer()
}

fn name(common_name: &str) -> Result<openssl::x509::X509Name, ErrorStack> {
    let mut b = X509NameBuilder::new()?;
    b.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    Ok(b.build())
}
