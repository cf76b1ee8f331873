//! TLS termination: rustls with safe defaults only (TLS 1.2 and 1.3, ECDHE
//! with AEAD ciphers: the only suites rustls has), ALPN `h2` and `http/1.1`,
//! certificate, key and client CA hot reload, and optional client certificates.
//!
//! Crypto provider: `ring`, the only one in the dependency tree (also used by
//! the upstream client). Keys may be PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM.

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// `[server.tls]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle for client certificates (mTLS); `None`: no client certs asked.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse connections without a valid client cert at the
    /// handshake (`true`), or accept them and fall back to token auth (`false`).
    pub client_cert_required: bool,
    /// How often the cert and key files are checked for changes.
    pub reload_interval: Duration,
}

/// The identity of a verified client certificate: subject CN and SAN names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertIdentity {
    pub names: Vec<String>,
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("{}: not a PEM private key: {e}", path.display()))?
        .ok_or_else(|| {
            format!(
                "{}: no private key (PKCS#8, PKCS#1 or SEC1 PEM) in the file",
                path.display()
            )
        })
}

/// Loads a certificate chain and its key, and checks that they belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = read_certs(cert)?;
    let key_der = read_key(key)?;
    let provider = crate::upstream::crypto_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("{}: unusable private key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        format!(
            "{} and {} do not belong together: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// Seconds since the epoch at which the leaf certificate expires.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// Subject CN and SAN DNS/URI/email names of a certificate.
pub fn cert_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        use x509_parser::extensions::GeneralName;
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                    names.push((*s).to_string())
                }
                _ => {}
            }
        }
    }
    names
}

/// Modification time and length of a file (following symlinks).
type FileVersion = Option<(SystemTime, u64)>;
/// Versions of the cert file and the key file.
type PairVersion = (FileVersion, FileVersion);

fn file_version(path: &Path) -> FileVersion {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The certificate in use; swapped atomically for new handshakes.
#[derive(Debug)]
pub struct CertStore {
    settings: TlsSettings,
    current: ArcSwap<CertifiedKey>,
    seen: Mutex<PairVersion>,
}

impl CertStore {
    pub fn load(settings: &TlsSettings) -> Result<Arc<Self>, String> {
        let seen = (file_version(&settings.cert), file_version(&settings.key));
        let pair = load_pair(&settings.cert, &settings.key)?;
        let store = Arc::new(Self {
            settings: settings.clone(),
            current: ArcSwap::new(pair),
            seen: Mutex::new(seen),
        });
        store.publish_expiry();
        Ok(store)
    }

    pub fn not_after(&self) -> Option<i64> {
        self.current.load().cert.first().and_then(not_after)
    }

    /// Whether the certificate in use is still valid now.
    pub fn valid_now(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.not_after().is_some_and(|t| t > now)
    }

    fn publish_expiry(&self) {
        if let Some(t) = self.not_after() {
            metrics::gauge!("rungen_gateway_tls_cert_expiry_timestamp_seconds").set(t as f64);
        }
    }

    fn pair_version(&self) -> PairVersion {
        (
            file_version(&self.settings.cert),
            file_version(&self.settings.key),
        )
    }

    /// Whether the cert or key file differs from the version last read.
    fn pair_changed(&self) -> bool {
        self.pair_version() != *crate::sync::lock(&self.seen)
    }

    /// Re-reads the files if they changed; a bad new pair is rejected and the
    /// old one keeps serving. Returns whether a new pair was installed.
    pub fn reload_if_changed(&self) -> bool {
        let now = self.pair_version();
        if *crate::sync::lock(&self.seen) == now {
            return false;
        }
        match load_pair(&self.settings.cert, &self.settings.key) {
            Ok(pair) => {
                self.current.store(pair);
                *crate::sync::lock(&self.seen) = now;
                self.publish_expiry();
                metrics::counter!("rungen_gateway_tls_reloads_total", "outcome" => "success")
                    .increment(1);
                tracing::info!(cert = %self.settings.cert.display(), not_after = ?self.not_after(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                // Remember the broken version so the error is logged once per change.
                *crate::sync::lock(&self.seen) = now;
                metrics::counter!("rungen_gateway_tls_reloads_total", "outcome" => "error")
                    .increment(1);
                tracing::error!(error = %e, "new TLS certificate rejected; the previous one keeps serving");
                false
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The rustls server config: TLS 1.2 + 1.3, ALPN h2 and http/1.1, the
/// reloading certificate, and client certificates if configured (the CA file
/// as it reads now).
fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = crate::upstream::crypto_provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = match &store.settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: invalid CA certificate: {e}", ca.display()))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = if store.settings.client_cert_required {
                verifier.build()
            } else {
                verifier.allow_unauthenticated().build()
            }
            .map_err(|e| format!("{}: client certificate verifier: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What the listener hands each new connection: the rustls config in use,
/// rebuilt when the client CA file changes (the certificate and key swap
/// inside it, through [`CertStore`]).
#[derive(Debug)]
pub struct Acceptor {
    store: Arc<CertStore>,
    config: ArcSwap<rustls::ServerConfig>,
    ca_seen: Mutex<FileVersion>,
}

impl Acceptor {
    pub fn new(store: Arc<CertStore>) -> Result<Arc<Self>, String> {
        let ca_seen = store.settings.client_ca.as_deref().and_then(file_version);
        let config = server_config(store.clone())?;
        Ok(Arc::new(Self {
            store,
            config: ArcSwap::new(config),
            ca_seen: Mutex::new(ca_seen),
        }))
    }

    /// The acceptor for a new connection (existing ones keep theirs).
    pub fn current(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    fn ca_version(&self) -> FileVersion {
        self.store
            .settings
            .client_ca
            .as_deref()
            .and_then(file_version)
    }

    fn ca_changed(&self) -> bool {
        self.store.settings.client_ca.is_some()
            && self.ca_version() != *crate::sync::lock(&self.ca_seen)
    }

    /// Re-reads the client CA file if it changed; a bad file is rejected and
    /// the previous CAs keep verifying. Returns whether new CAs were installed.
    pub fn reload_client_ca_if_changed(&self) -> bool {
        if !self.ca_changed() {
            return false;
        }
        // Remember the version first, so a broken file is logged once per change.
        *crate::sync::lock(&self.ca_seen) = self.ca_version();
        match server_config(self.store.clone()) {
            Ok(config) => {
                self.config.store(config);
                metrics::counter!("rungen_gateway_tls_reloads_total", "outcome" => "success")
                    .increment(1);
                tracing::info!("TLS client CA file reloaded; new connections verify against it");
                true
            }
            Err(e) => {
                metrics::counter!("rungen_gateway_tls_reloads_total", "outcome" => "error")
                    .increment(1);
                tracing::error!(error = %e, "new TLS client CA file rejected; the previous CAs keep verifying");
                false
            }
        }
    }
}

/// Checks the cert, key and client CA files every `reload_interval` until `stopped`.
pub fn spawn_reloader(acceptor: Arc<Acceptor>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let every = acceptor.store.settings.reload_interval;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(every) => {}
            }
            let a = acceptor.clone();
            let changed =
                tokio::task::spawn_blocking(move || a.store.pair_changed() || a.ca_changed())
                    .await
                    .unwrap_or(false);
            if changed {
                // Debounce: a changed file is read again a moment later, once written.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let a = acceptor.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    a.store.reload_if_changed();
                    a.reload_client_ca_if_changed();
                })
                .await;
            }
        }
    });
}
