//! Downstream TLS of the proxy listener: owns the certificate chain and key the listener serves,
//! their validation, the pingora `TlsSettings` (HTTP/2 and HTTP/1.1 by ALPN), and reloading them
//! when the files change. Every handshake takes the current pair from an `ArcSwap`, so a renewed
//! certificate is served to the next connection without a restart; a bad new pair is logged and
//! the old one stays.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::listeners::TlsAccept;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::tls::TlsRef;
use pingora::tls::ext;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::x509::X509;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Tools that replace certificates (certbot, cert-manager, editors) write in several steps; wait
/// this long after the first event before reading.
const SETTLE: Duration = Duration::from_millis(150);
/// A check of the files even without events: file-system events can be lost (network file
/// systems, a directory that was itself replaced).
const RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert {}: {source}", path.display())]
    ReadCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--tls-key {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--tls-cert {}: not a PEM certificate chain: {reason}", path.display())]
    BadCert { path: PathBuf, reason: String },
    #[error("--tls-key {}: not a PEM private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("--tls-key {} is not the key of the certificate in --tls-cert {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("setting up TLS: {0}")]
    Setup(String),
}

/// A certificate chain (leaf first) and the leaf's private key, checked to belong together.
pub struct CertPair {
    leaf: X509,
    chain: Vec<X509>,
    key: PKey<Private>,
}

impl CertPair {
    /// Parse PEM text; the paths only name the files in errors.
    pub fn parse(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<CertPair, TlsError> {
        let bad_cert = |reason: String| TlsError::BadCert {
            path: cert_path.to_path_buf(),
            reason,
        };
        let mut certs = X509::stack_from_pem(cert_pem)
            .map_err(|e| bad_cert(e.to_string()))?
            .into_iter();
        let leaf = certs
            .next()
            .ok_or_else(|| bad_cert("no certificate in the file".into()))?;
        let chain = certs.collect();
        let key = PKey::private_key_from_pem(key_pem).map_err(|e| TlsError::BadKey {
            path: key_path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let public = leaf.public_key().map_err(|e| bad_cert(e.to_string()))?;
        if !public.public_eq(&key) {
            return Err(TlsError::Mismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
        Ok(CertPair { leaf, chain, key })
    }

    /// SHA-256 of the leaf certificate (DER), in hex: how logs name the certificate served.
    pub fn fingerprint(&self) -> String {
        self.leaf
            .to_der()
            .map(|der| hex(&Sha256::digest(der)))
            .unwrap_or_default()
    }

    fn install(&self, ssl: &mut TlsRef) -> Result<(), pingora::tls::error::ErrorStack> {
        ext::ssl_use_certificate(ssl, &self.leaf)?;
        ext::ssl_use_private_key(ssl, &self.key)?;
        for c in &self.chain {
            ext::ssl_add_chain_cert(ssl, c)?;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The certificate files and the pair loaded from them, shared by the listener's handshakes and
/// the watcher that reloads it.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertPair>,
    /// Digest of the file contents last tried (loaded or rejected): unchanged files are not
    /// parsed again, and a rejected pair is reported once, not at every check.
    tried: Mutex<[u8; 32]>,
}

impl CertStore {
    /// Load the pair; an error names the file at fault.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<CertStore>, TlsError> {
        let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
        let pair = CertPair::parse(&cert_pem, &key_pem, cert_path, key_path)?;
        tracing::info!(cert = %cert_path.display(), sha256 = %pair.fingerprint(), "TLS certificate loaded");
        Ok(Arc::new(CertStore {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: ArcSwap::from_pointee(pair),
            tried: Mutex::new(digest(&cert_pem, &key_pem)),
        }))
    }

    /// The pair handshakes use now.
    pub fn current(&self) -> Arc<CertPair> {
        self.current.load_full()
    }

    /// Read the files again and serve their pair if they changed and are valid. `Ok(true)`: a new
    /// pair is served; `Ok(false)`: nothing changed (or this content was already rejected); an
    /// error leaves the current pair in place.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = read_pair(&self.cert_path, &self.key_path)?;
        let seen = digest(&cert_pem, &key_pem);
        {
            let mut tried = self.tried.lock().unwrap_or_else(|e| e.into_inner());
            if *tried == seen {
                return Ok(false);
            }
            *tried = seen;
        }
        let pair = CertPair::parse(&cert_pem, &key_pem, &self.cert_path, &self.key_path)?;
        tracing::info!(cert = %self.cert_path.display(), sha256 = %pair.fingerprint(), "TLS certificate reloaded");
        self.current.store(Arc::new(pair));
        Ok(true)
    }

    /// Reload on every change of the files until the process ends (and every [`RECHECK`] in case
    /// an event was lost). Failures are logged; the current pair stays.
    pub async fn watch(self: Arc<Self>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Any event in the directories counts: a Kubernetes secret swaps a `..data` symlink,
            // not the files named on the command line. Unchanged contents are skipped anyway.
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        });
        // Held for as long as the loop runs: dropping it stops the events.
        let _watcher = match watcher {
            Ok(mut w) => {
                for dir in self.dirs() {
                    // Directories, not files: renaming a new file over the old one (the usual way
                    // to replace a certificate) would end a watch on the file itself.
                    if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the TLS certificate's directory; checking it every minute");
                    }
                }
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the TLS certificate; checking it every minute");
                None
            }
        };
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.tick().await;
        // False once the watcher is gone (it could not start): the periodic check remains.
        let mut events = true;
        loop {
            tokio::select! {
                event = rx.recv(), if events => {
                    if event.is_none() {
                        events = false;
                        continue;
                    }
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = recheck.tick() => {}
            }
            let store = self.clone();
            match tokio::task::spawn_blocking(move || store.reload()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(
                    error = %e,
                    "new TLS certificate rejected; the previous one is still served"
                ),
                Err(e) => tracing::error!(error = %e, "TLS certificate reload failed"),
            }
        }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        let parent = |p: &Path| {
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        };
        let mut dirs = vec![parent(&self.cert_path)];
        let key_dir = parent(&self.key_path);
        if !dirs.contains(&key_dir) {
            dirs.push(key_dir);
        }
        dirs
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let cert = std::fs::read(cert_path).map_err(|source| TlsError::ReadCert {
        path: cert_path.to_path_buf(),
        source,
    })?;
    let key = std::fs::read(key_path).map_err(|source| TlsError::ReadKey {
        path: key_path.to_path_buf(),
        source,
    })?;
    Ok((cert, key))
}

fn digest(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    // Lengths first, so that moving bytes from one file to the other changes the digest.
    h.update((cert_pem.len() as u64).to_le_bytes());
    h.update(cert_pem);
    h.update(key_pem);
    h.finalize().into()
}

/// Hands each handshake the store's current pair.
struct CurrentCert(Arc<CertStore>);

#[async_trait]
impl TlsAccept for CurrentCert {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        if let Err(e) = self.0.current().install(ssl) {
            // The handshake then fails for this client only.
            tracing::error!(error = %e, "cannot use the TLS certificate for a handshake");
        }
    }
}

/// The proxy listener's TLS settings: Mozilla's intermediate profile, the store's certificate at
/// every handshake, HTTP/2 preferred over HTTP/1.1 by ALPN.
pub fn settings(store: Arc<CertStore>) -> Result<TlsSettings, TlsError> {
    let mut settings = TlsSettings::with_callbacks(Box::new(CurrentCert(store)))
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    settings.enable_h2();
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mock_upstream::tls::TestCa;

    struct Files {
        dir: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    }

    impl Files {
        fn new(tag: &str) -> Files {
            let dir =
                std::env::temp_dir().join(format!("tollgate-tls-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Files {
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
                dir,
            }
        }

        fn write(&self, cert: &[u8], key: &[u8]) {
            std::fs::write(&self.cert, cert).unwrap();
            std::fs::write(&self.key, key).unwrap();
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_valid_pair_loads() {
        let f = Files::new("valid");
        let (cert, key) = TestCa::new().unwrap().issue().unwrap();
        f.write(&cert, &key);
        let store = CertStore::load(&f.cert, &f.key).unwrap();
        assert_eq!(store.current().fingerprint().len(), 64);
        assert!(settings(store).is_ok());
    }

    #[test]
    fn errors_name_the_file_at_fault() {
        let f = Files::new("errors");
        let ca = TestCa::new().unwrap();
        let (cert, key) = ca.issue().unwrap();
        let (_, other_key) = ca.issue().unwrap();

        let missing = CertStore::load(&f.cert, &f.key).err().unwrap().to_string();
        assert!(
            missing.starts_with("--tls-cert ") && missing.contains("cert.pem"),
            "{missing}"
        );

        f.write(b"not a certificate", &key);
        let e = CertStore::load(&f.cert, &f.key).err().unwrap().to_string();
        assert!(
            e.starts_with("--tls-cert ") && e.contains("cert.pem"),
            "{e}"
        );

        f.write(
            &cert,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let e = CertStore::load(&f.cert, &f.key).err().unwrap().to_string();
        assert!(e.starts_with("--tls-key ") && e.contains("key.pem"), "{e}");

        f.write(&cert, &other_key);
        let e = CertStore::load(&f.cert, &f.key).err().unwrap();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
    }

    #[test]
    fn a_bad_new_pair_keeps_the_old_one_and_a_good_one_replaces_it() {
        let f = Files::new("reload");
        let ca = TestCa::new().unwrap();
        let (cert1, key1) = ca.issue().unwrap();
        let (cert2, key2) = ca.issue().unwrap();
        f.write(&cert1, &key1);
        let store = CertStore::load(&f.cert, &f.key).unwrap();
        let first = store.current().fingerprint();
        assert!(!store.reload().unwrap(), "unchanged files are not reloaded");

        // Half-way through a replacement: the new certificate with the old key.
        f.write(&cert2, &key1);
        assert!(matches!(store.reload(), Err(TlsError::Mismatch { .. })));
        assert_eq!(store.current().fingerprint(), first);
        assert!(!store.reload().unwrap(), "a rejected pair is reported once");

        f.write(&cert2, &key2);
        assert!(store.reload().unwrap());
        assert_ne!(store.current().fingerprint(), first);
    }
}
