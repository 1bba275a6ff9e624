//! Reading the TLS files: CA certificates and client identities. Every
//! error names the service, the config key and the file, and says what the
//! file must hold; none ever shows a key or a password.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{ClientIdentity, Service};

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{service}: {key} = \"{}\": {problem}", path.display())]
pub struct FileError {
    pub service: Service,
    pub key: &'static str,
    pub path: PathBuf,
    pub problem: String,
}

impl FileError {
    /// The problem with the file's path, without the service and key (for a
    /// config error, which names the key itself).
    pub fn problem_with_path(&self) -> String {
        format!("\"{}\" {}", self.path.display(), self.problem)
    }
}

fn err(service: Service, key: &'static str, path: &Path, problem: impl Into<String>) -> FileError {
    FileError {
        service,
        key,
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

fn read(service: Service, key: &'static str, path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| {
        err(
            service,
            key,
            path,
            format!("cannot read it ({e}); give the path of a file this process can read"),
        )
    })
}

/// A CA file: its PEM text and the certificates in it (at least one).
pub fn read_ca(
    service: Service,
    key: &'static str,
    path: &Path,
) -> Result<(String, Vec<CertificateDer<'static>>), FileError> {
    let bytes = read(service, key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(service, key, path, format!("is not valid PEM ({e}); it must hold the CA certificate as -----BEGIN CERTIFICATE-----")))?;
    if certs.is_empty() {
        return Err(err(
            service,
            key,
            path,
            "holds no certificate; it must hold the CA certificate that signed the server's certificate, in PEM (-----BEGIN CERTIFICATE-----)",
        ));
    }
    let pem = String::from_utf8(bytes).map_err(|_| {
        err(service, key, path, "is not text; convert a DER file with `openssl x509 -inform der -in CA.der -out CA.pem`")
    })?;
    Ok((pem, certs))
}

/// The config keys of an identity, for messages.
pub fn identity_keys(identity: &ClientIdentity) -> (&'static str, &'static str) {
    match identity {
        ClientIdentity::Pem { .. } => ("amqp_client_cert_file", "amqp_client_key_file"),
        ClientIdentity::Pkcs12 { .. } => {
            ("amqp_client_pkcs12_file", "amqp_client_pkcs12_password_env")
        }
    }
}

/// A client identity as a certificate chain and a private key.
pub fn read_identity(
    service: Service,
    identity: &ClientIdentity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), FileError> {
    match identity {
        ClientIdentity::Pem {
            cert_file,
            key_file,
        } => {
            let (cert_key, key_key) = identity_keys(identity);
            let bytes = read(service, cert_key, cert_file)?;
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    err(
                        service,
                        cert_key,
                        cert_file,
                        format!("is not valid PEM ({e})"),
                    )
                })?;
            if certs.is_empty() {
                return Err(err(
                    service,
                    cert_key,
                    cert_file,
                    "holds no certificate; it must hold the client certificate in PEM (-----BEGIN CERTIFICATE-----)",
                ));
            }
            let key_bytes = read(service, key_key, key_file)?;
            // The parser's own message can quote the file; say only what is wrong.
            let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| {
                err(
                    service,
                    key_key,
                    key_file,
                    "holds no unencrypted PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC); decrypt it with `openssl pkey -in KEY -out KEY.pem`",
                )
            })?;
            Ok((certs, key))
        }
        ClientIdentity::Pkcs12 { file, password } => {
            let (key, _) = identity_keys(identity);
            let der = read(service, key, file)?;
            let store = p12_keystore::KeyStore::from_pkcs12(&der, password.expose()).map_err(|_| {
                err(
                    service,
                    key,
                    file,
                    "cannot be opened: not a PKCS#12 file, or the password (amqp_client_pkcs12_password_env / _file) is wrong",
                )
            })?;
            let Some((_, chain)) = store.private_key_chain() else {
                return Err(err(
                    service,
                    key,
                    file,
                    "holds no private key; export the client certificate together with its key",
                ));
            };
            let certs = chain
                .chain()
                .iter()
                .map(|c| CertificateDer::from(c.as_der().to_vec()))
                .collect();
            let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(chain.key().to_vec()));
            Ok((certs, key))
        }
    }
}

/// The identity in the form lapin takes (checked first with
/// [`read_identity`], so that a bad file gets our message, not lapin's).
pub fn lapin_identity(identity: &ClientIdentity) -> Result<lapin::tcp::OwnedIdentity, FileError> {
    read_identity(Service::Broker, identity)?;
    match identity {
        ClientIdentity::Pem {
            cert_file,
            key_file,
        } => {
            let (ck, kk) = identity_keys(identity);
            Ok(lapin::tcp::OwnedIdentity::PKCS8 {
                pem: read(Service::Broker, ck, cert_file)?,
                key: read(Service::Broker, kk, key_file)?,
            })
        }
        ClientIdentity::Pkcs12 { file, password } => Ok(lapin::tcp::OwnedIdentity::PKCS12 {
            der: read(Service::Broker, "amqp_client_pkcs12_file", file)?,
            password: password.expose().to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_ca_files_name_service_key_and_file() {
        let dir = std::env::temp_dir().join(format!("halosync-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("nope.pem");
        let e = read_ca(Service::Redis, "redis_ca_file", &missing)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Redis: redis_ca_file = "), "{e}");
        assert!(e.contains("nope.pem"), "{e}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = read_ca(Service::Broker, "amqp_ca_file", &empty)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("RabbitMQ") && e.contains("amqp_ca_file") && e.contains("BEGIN CERTIFICATE"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_wrong_pkcs12_password_is_not_echoed() {
        let dir = std::env::temp_dir().join(format!("halosync-p12-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("client.p12");
        std::fs::write(&file, b"\x30\x03\x02\x01\x03").unwrap();
        let id = ClientIdentity::Pkcs12 {
            file,
            password: crate::config::Secret::new("hunter2"),
        };
        let e = read_identity(Service::Broker, &id).unwrap_err().to_string();
        assert!(
            e.contains("amqp_client_pkcs12_file") && !e.contains("hunter2"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
