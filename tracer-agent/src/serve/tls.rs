//! The certificate of the HTTPS side of `--metrics-addr`: from files (cert-manager, or a
//! Kubernetes secret), read again whenever they change, or — when none is given — a
//! self-signed one made at start, so that bearer tokens never cross the network in clear.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{
    self, ServerConfig,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tracing::{info, warn};

/// How often the certificate files are read again. A mounted secret changes by an atomic swap
/// of the whole directory, within a minute of its update in the API server; cert-manager
/// renews weeks before expiry: 30 s is early enough and costs two small reads.
pub const RELOAD_PERIOD: Duration = Duration::from_secs(30);

/// Why a certificate cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey { path: PathBuf },
    #[error("the key does not fit the certificate or is of a kind rustls cannot sign with")]
    Key(#[source] rustls::Error),
    #[error("making a self-signed certificate")]
    SelfSigned(#[from] rcgen::Error),
    #[error("building the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// The certificate and key files given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the certificate comes from, and the one served now.
#[derive(Debug)]
pub struct ServerTls {
    current: Arc<Current>,
    files: Option<CertificateFiles>,
}

impl ServerTls {
    /// The certificate in `files`, or a self-signed one for `names` (DNS names and IP
    /// addresses, as text) when there are none.
    pub fn load(files: Option<CertificateFiles>, names: &[String]) -> Result<Self, TlsError> {
        let key = match &files {
            Some(files) => {
                let (cert, key) = read(files)?;
                certified(&cert, &key)?
            }
            None => self_signed(names)?,
        };
        Ok(Self {
            current: Arc::new(Current(RwLock::new(Arc::new(key)))),
            files,
        })
    }

    /// Whether the certificate was made at start rather than read from files.
    pub fn is_self_signed(&self) -> bool {
        self.files.is_none()
    }

    /// The SHA-256 fingerprint of the certificate served now, as `ab:cd:…`: what an operator
    /// compares with what a scraper saw.
    pub fn fingerprint(&self) -> String {
        let key = self.current.get();
        let der = key
            .end_entity_cert()
            .map(|cert| cert.as_ref())
            .unwrap_or(&[]);
        ::ring::digest::digest(&::ring::digest::SHA256, der)
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// A TLS acceptor that serves whichever certificate is current at each handshake.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let resolver: Arc<Current> = Arc::clone(&self.current);
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Reads the files every `period` and serves what they hold once it changed and is whole
    /// (a certificate and its key): a half-written renewal is skipped, with a warning, and the
    /// previous certificate stays. Runs until the runtime stops; nothing to do when the
    /// certificate is self-signed.
    pub async fn follow_files(self, period: Duration) {
        let Some(files) = self.files else { return };
        let mut served = read(&files).ok();
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let read = read(&files);
            if let (Ok(now), Some(before)) = (&read, &served)
                && now == before
            {
                continue;
            }
            match read.and_then(|(cert, key)| Ok((certified(&cert, &key)?, (cert, key)))) {
                Ok((key, contents)) => {
                    self.current.set(key);
                    served = Some(contents);
                    info!(cert = %files.cert.display(), "serving the renewed TLS certificate");
                }
                Err(error) => {
                    let error = anyhow::Error::new(error);
                    warn!("keeping the TLS certificate served so far: {error:#}");
                    // Tried again at the next tick, whatever it holds then.
                    served = None;
                }
            }
        }
    }
}

/// rustls with *ring*, the provider the Kubernetes client already brings, chosen here rather
/// than through a process-wide default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The files' contents, as bytes.
fn read(files: &CertificateFiles) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert = read(&files.cert)?;
    let key = read(&files.key)?;
    if CertificateDer::pem_slice_iter(&cert).next().is_none() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    if PrivateKeyDer::from_pem_slice(&key).is_err() {
        return Err(TlsError::NoKey {
            path: files.key.clone(),
        });
    }
    Ok((cert, key))
}

/// A certificate chain and its key from PEM, checked to belong together.
fn certified(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| {
        TlsError::Key(rustls::Error::General(format!("reading the key: {error}")))
    })?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Key)?;
    Ok(key)
}

/// A certificate for `names`, signed by its own key (ECDSA P-256), valid from now for ten
/// years: it lives as long as the agent's process.
fn self_signed(names: &[String]) -> Result<CertifiedKey, TlsError> {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names.to_vec())?;
    certified(
        cert.pem().as_bytes(),
        signing_key.serialize_pem().as_bytes(),
    )
}

/// The certificate served now, swapped whole when the files change.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl Current {
    fn get(&self) -> Arc<CertifiedKey> {
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn set(&self, key: CertifiedKey) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Certificates and clients for the tests of the HTTPS side.
#[cfg(test)]
pub(crate) mod testing {
    use tokio_rustls::{
        TlsConnector,
        rustls::{ClientConfig, RootCertStore},
    };

    use super::*;

    /// A certificate for `localhost` and its key, as PEM.
    pub(crate) fn pem_pair() -> (String, String) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (cert.pem(), signing_key.serialize_pem())
    }

    /// `cert` and `key` written as tls.crt and tls.key in `dir`.
    pub(crate) fn write(dir: &Path, (cert, key): &(String, String)) -> CertificateFiles {
        std::fs::create_dir_all(dir).unwrap();
        let files = CertificateFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        files
    }

    /// A TLS client that trusts only the certificates in `trusted` (PEM).
    pub(crate) fn client(trusted: &str) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(trusted.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };
    use tokio_rustls::rustls::pki_types::ServerName;

    use super::{
        testing::{client, pem_pair, write},
        *,
    };

    /// Serves one byte over TLS per connection, with `tls`'s current certificate.
    async fn serve(tls: &ServerTls) -> SocketAddr {
        let acceptor = tls.acceptor().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if let Ok(mut stream) = acceptor.accept(stream).await {
                    let _ = stream.write_all(b"!").await;
                    let _ = stream.shutdown().await;
                }
            }
        });
        address
    }

    /// Whether a client trusting only `trusted` completes a handshake with the server.
    async fn trusts(address: SocketAddr, trusted: &str) -> bool {
        let connector = client(trusted);
        let stream = TcpStream::connect(address).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let Ok(mut stream) = connector.connect(name, stream).await else {
            return false;
        };
        let mut byte = [0];
        stream.read_exact(&mut byte).await.is_ok() && byte == *b"!"
    }

    /// Real files, real handshakes on loopback: the certificate from the files is served, a
    /// renewal is served once written, and a broken one keeps the previous in place.
    #[tokio::test]
    async fn the_files_certificate_is_served_and_a_renewal_replaces_it() {
        let dir = std::env::temp_dir().join(format!("tracer-tls-{}", std::process::id()));
        let first = pem_pair();
        let files = write(&dir, &first);
        let first_cert = first.0;

        let tls = ServerTls::load(Some(files.clone()), &[]).unwrap();
        assert!(!tls.is_self_signed());
        let address = serve(&tls).await;
        let fingerprint = tls.fingerprint();
        tokio::spawn(tls.follow_files(Duration::from_millis(50)));
        assert!(trusts(address, &first_cert).await);

        // Half a renewal (a certificate without its key): the first stays.
        let (second_cert, second_key) = pem_pair();
        std::fs::write(&files.cert, &second_cert).unwrap();
        std::fs::write(&files.key, "not a key").unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(trusts(address, &first_cert).await, "kept while broken");

        std::fs::write(&files.key, &second_key).unwrap();
        let renewed = async {
            while !trusts(address, &second_cert).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), renewed)
            .await
            .expect("the renewal served within 5 s");
        assert!(!trusts(address, &first_cert).await, "the old one is gone");
        assert_eq!(fingerprint.len(), 32 * 3 - 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("tracer-tls-bad-{}", std::process::id()));
        let files = write(&dir, &pem_pair());
        std::fs::remove_file(&files.cert).unwrap();
        let missing = ServerTls::load(Some(files.clone()), &[]).unwrap_err();
        assert!(missing.to_string().contains("tls.crt"), "{missing}");

        let (cert, _) = pem_pair();
        let (_, other_key) = pem_pair();
        std::fs::write(&files.cert, &cert).unwrap();
        std::fs::write(&files.key, "-----BEGIN NOTHING-----\n").unwrap();
        let no_key = ServerTls::load(Some(files.clone()), &[]).unwrap_err();
        assert!(matches!(no_key, TlsError::NoKey { .. }), "{no_key}");

        std::fs::write(&files.key, &other_key).unwrap();
        let mismatch = ServerTls::load(Some(files), &[]).unwrap_err();
        assert!(matches!(mismatch, TlsError::Key(_)), "{mismatch}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn without_files_a_self_signed_certificate_is_served() {
        let tls = ServerTls::load(None, &["localhost".to_owned()]).unwrap();
        assert!(tls.is_self_signed());
        let address = serve(&tls).await;
        // No client trusts it unless told to: it is its own issuer.
        let (other, _) = pem_pair();
        assert!(!trusts(address, &other).await);
    }
}
