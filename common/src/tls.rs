//! TLS for gRPC clients (the agent and the CLI): an `https://` address is
//! dialled with TLS (rustls), verifying the scheduler against the given CA
//! and, for mutual TLS, presenting a client certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Client-side TLS files (PEM).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA that signed the scheduler's certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Name to verify instead of the address's host.
    pub domain: Option<String>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {what} {}: {e}", path.display()))
}

impl ClientTls {
    /// An endpoint for `addr`; `https://` addresses get TLS.
    pub fn endpoint(&self, addr: &str, connect_timeout: Duration) -> anyhow::Result<Endpoint> {
        let mut endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|e| anyhow::anyhow!("invalid address `{addr}`: {e}"))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        if addr.starts_with("https://") {
            let ca = self.ca_file.as_ref().ok_or_else(|| {
                anyhow::anyhow!("{addr} uses TLS: give the CA that signed the scheduler's certificate (tls_ca_file / --tls-ca)")
            })?;
            let mut tls =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "CA")?));
            match (&self.cert_file, &self.key_file) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(
                        read(cert, "client certificate")?,
                        read(key, "client key")?,
                    ));
                }
                (None, None) => {}
                _ => anyhow::bail!("a client certificate needs both its certificate and key files"),
            }
            if let Some(domain) = &self.domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(tls)?;
        } else if self.ca_file.is_some() || self.cert_file.is_some() {
            anyhow::bail!("TLS files are set but {addr} is not an https:// address");
        }
        Ok(endpoint)
    }
}
