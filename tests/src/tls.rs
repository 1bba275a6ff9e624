//! TLS fixtures for the integration tests: a private PKI made with rcgen,
//! a TLS-only `redis-server` of the test's own (with an ACL user), and a
//! TLS-terminating TCP proxy in front of the shared RabbitMQ, so that the
//! shared broker is never reconfigured or restarted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// The password of [`Pki::client_p12`].
pub const P12_PASSWORD: &str = "p12-pw-93hd";

/// A CA, a server certificate it signed (for `127.0.0.1` and `localhost`),
/// a client certificate it signed, and a second, unrelated CA.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The client certificate and key as PKCS#12, password [`P12_PASSWORD`].
    pub client_p12: PathBuf,
    /// A CA that signed nothing here: trusting it must fail the handshake.
    pub other_ca: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("self-sign CA");
    (params, key, cert.pem())
}

impl Pki {
    /// Writes every file into `dir` (created).
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let (ca_params, ca_key, ca_pem) = ca("halosync test CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write pki file");
            p
        };
        let server_key = KeyPair::generate().expect("server key");
        let mut server = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        server
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &issuer).expect("sign server");
        let client_key = KeyPair::generate().expect("client key");
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("params");
        client
            .distinguished_name
            .push(DnType::CommonName, "halosync-worker");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &issuer).expect("sign client");
        let (_, _, other_pem) = ca("unrelated CA");
        let mut p12 = p12_keystore::KeyStore::new();
        let chain = p12_keystore::PrivateKeyChain::new(
            client_key.serialize_der(),
            *b"halosync",
            [p12_keystore::Certificate::from_der(client_cert.der()).expect("client cert der")],
        );
        p12.add_entry(
            "client",
            p12_keystore::KeyStoreEntry::PrivateKeyChain(chain),
        );
        let p12_der = p12.writer(P12_PASSWORD).write().expect("write PKCS#12");
        let client_p12 = dir.join("client.p12");
        std::fs::write(&client_p12, p12_der).expect("write client.p12");
        Pki {
            dir: dir.to_path_buf(),
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_cert.pem()),
            server_key: write("server.key", &server_key.serialize_pem()),
            client_cert: write("client.pem", &client_cert.pem()),
            client_key: write("client.key", &client_key.serialize_pem()),
            client_p12,
            other_ca: write("other-ca.pem", &other_pem),
        }
    }

    fn server_identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let certs = CertificateDer::pem_file_iter(&self.server_cert)
            .expect("server cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("server cert pem");
        let key = PrivateKeyDer::from_pem_file(&self.server_key).expect("server key");
        (certs, key)
    }
}

pub use crate::free_port;

/// A TLS-only redis-server of this test (no plain-text port), with
/// `default` disabled and one ACL user, killed on drop.
pub struct TlsRedis {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl TlsRedis {
    /// Starts it; panics (with its log) if it does not accept TLS within 10 s,
    /// e.g. when redis-server was built without TLS.
    pub fn start(pki: &Pki, user: &str, password: &str) -> TlsRedis {
        let port = free_port();
        let log = pki.dir.join(format!("redis-{port}.log"));
        let out = std::fs::File::create(&log).expect("redis log");
        let pass = format!(">{password}");
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--tls-port",
                &port.to_string(),
            ])
            .arg("--tls-cert-file")
            .arg(&pki.server_cert)
            .arg("--tls-key-file")
            .arg(&pki.server_key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir"])
            .arg(&pki.dir)
            .args(["--user", "default", "off"])
            .args(["--user", user, "on", &pass, "~*", "&*", "+@all"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("redis-server must be installed (Debian package redis-server)");
        let r = TlsRedis { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the TLS redis-server did not listen on {port}:\n{}",
                std::fs::read_to_string(&r.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// `rediss://USER@127.0.0.1:PORT/0` (the password comes from elsewhere).
    pub fn url(&self, user: &str) -> String {
        format!("rediss://{user}@127.0.0.1:{}/0", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS-terminating TCP proxy on 127.0.0.1 forwarding to `upstream`,
/// optionally requiring a client certificate signed by the PKI's CA.
pub struct TlsProxy {
    pub port: u16,
    /// TLS sessions that completed the handshake.
    pub handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(pki: &Pki, upstream: SocketAddr, require_client_cert: bool) -> TlsProxy {
        let (certs, key) = pki.server_identity();
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(&pki.ca).expect("ca") {
                roots.add(c.expect("ca pem")).expect("ca root");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key).expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let count = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let count = count.clone();
                tokio::spawn(async move {
                    // A failed handshake just drops the client, as a broker does.
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        TlsProxy {
            port,
            handshakes,
            task,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
