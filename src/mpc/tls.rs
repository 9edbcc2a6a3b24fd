//! Mutual TLS 1.3 for the three links (P0 ↔ P1, P0 ↔ dealer, P1 ↔ dealer).
//!
//! # Roles and certificates
//!
//! One CA (made by `mpcformer mpc certs`) signs one certificate per role. A certificate's role is
//! its DNS subject alternative name ([`Role::dns_name`]: `p0.mpcformer`, `p1.mpcformer`,
//! `dealer.mpcformer`); nothing else in a connection can claim a role:
//!
//! - a **client** (P1 towards P0, both parties towards the dealer) checks the server's chain
//!   against the CA *and* that it is valid for the role it expects (`p0.mpcformer`,
//!   `dealer.mpcformer`), whatever address it dialled;
//! - a **server** requires a client certificate chained to the CA and reads the client's role
//!   from it ([`peer_role`]); the dealer hands P0's seed only to a `p0.mpcformer` certificate.
//!
//! TLS 1.3 only, ring provider, no session resumption (every session is a full handshake).
//!
//! # Layout of `--certs DIR`
//!
//! | file | what | who needs it |
//! |---|---|---|
//! | `ca.pem` | the CA certificate (trust anchor) | every role |
//! | `p0.pem`, `p0.key` | P0's certificate and key | P0 |
//! | `p1.pem`, `p1.key` | P1's certificate and key | P1 |
//! | `dealer.pem`, `dealer.key` | the dealer's certificate and key | the dealer |
//!
//! The CA's key is not written: nobody can issue another certificate for this CA, and a new set
//! (`mpc certs --force`) replaces all of them. Keys are PKCS#8 PEM, mode 0600, written
//! atomically.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{MpcError, Party, Result};

/// Who is at the end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    P0,
    P1,
    Dealer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::P0, Role::P1, Role::Dealer];

    /// The DNS name the role's certificate is issued for (and checked against).
    pub fn dns_name(self) -> &'static str {
        match self {
            Role::P0 => "p0.mpcformer",
            Role::P1 => "p1.mpcformer",
            Role::Dealer => "dealer.mpcformer",
        }
    }

    /// File stem in a certificates directory (`p0` → `p0.pem`, `p0.key`).
    pub fn file_stem(self) -> &'static str {
        match self {
            Role::P0 => "p0",
            Role::P1 => "p1",
            Role::Dealer => "dealer",
        }
    }

    pub fn party(self) -> Option<Party> {
        match self {
            Role::P0 => Some(Party::P0),
            Role::P1 => Some(Party::P1),
            Role::Dealer => None,
        }
    }
}

impl From<Party> for Role {
    fn from(p: Party) -> Self {
        match p {
            Party::P0 => Role::P0,
            Party::P1 => Role::P1,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::P0 => "P0",
            Role::P1 => "P1",
            Role::Dealer => "dealer",
        })
    }
}

/// CA certificate file name in a certificates directory.
pub const CA_FILE: &str = "ca.pem";

/// Where one role's trust anchor, certificate and key are.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPaths {
    /// The standard layout of `dir` for `role`.
    pub fn in_dir(dir: &Path, role: Role) -> Self {
        let stem = role.file_stem();
        Self {
            ca: dir.join(CA_FILE),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }

    /// `dir`'s layout with any of the three paths overridden; `None` when neither a directory
    /// nor all three paths are given.
    pub fn resolve(
        dir: Option<&Path>,
        role: Role,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Option<Self> {
        let base = dir.map(|d| Self::in_dir(d, role));
        let pick =
            |o: Option<&Path>, b: Option<&PathBuf>| o.map(Path::to_path_buf).or_else(|| b.cloned());
        Some(Self {
            ca: pick(ca, base.as_ref().map(|b| &b.ca))?,
            cert: pick(cert, base.as_ref().map(|b| &b.cert))?,
            key: pick(key, base.as_ref().map(|b| &b.key))?,
        })
    }
}

fn cfg_err(what: impl fmt::Display) -> MpcError {
    MpcError::Config(format!("TLS: {what}"))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One role's TLS identity: the CA to trust, its own chain and key, and the client and server
/// configurations built from them. `Debug` shows the role only.
pub struct TlsIdentity {
    role: Role,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Reads `paths` and checks that the certificate is `role`'s.
    pub fn load(role: Role, paths: &CertPaths) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read(p)
                .map_err(|e| cfg_err(format_args!("{role}: reading {}: {e}", p.display())))
        };
        Self::from_pem(
            role,
            &read(&paths.ca)?,
            &read(&paths.cert)?,
            &read(&paths.key)?,
        )
        .map_err(|e| {
            cfg_err(format_args!(
                "{role}: {} / {}: {e}",
                paths.cert.display(),
                paths.key.display()
            ))
        })
    }

    /// From PEM text: the CA certificate(s), this role's chain (leaf first), its private key.
    pub fn from_pem(role: Role, ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self> {
        let pem_err =
            |what: &str, e: rustls_pki_types::pem::Error| cfg_err(format_args!("{what}: {e}"));
        let cas = CertificateDer::pem_slice_iter(ca_pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| pem_err("CA certificate", e))?;
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| pem_err("certificate", e))?;
        // The key's parse error names no key material (pki-types reports section kinds only).
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_err("private key", e))?;
        if cas.is_empty() || chain.is_empty() {
            return Err(cfg_err("no certificate in the PEM file"));
        }
        if !cert_is_for(&chain[0], role) {
            return Err(cfg_err(format_args!(
                "the certificate is not {role}'s (it is not valid for {})",
                role.dns_name()
            )));
        }
        let mut roots = RootCertStore::empty();
        for c in cas {
            roots
                .add(c)
                .map_err(|e| cfg_err(format_args!("CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let versions = [&rustls::version::TLS13];
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions)
            .map_err(cfg_err)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(cfg_err)?;
        client.resumption = rustls::client::Resumption::disabled();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(cfg_err)?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions)
            .map_err(cfg_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(cfg_err)?;
        // No resumption, so tickets would only cost a round of bytes after every handshake.
        server.send_tls13_tickets = 0;
        Ok(Self {
            role,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// A client connection that accepts only a server certificate of role `server`.
    pub fn client_conn(&self, server: Role) -> Result<rustls::Connection> {
        let name = ServerName::try_from(server.dns_name()).map_err(cfg_err)?;
        let c = ClientConnection::new(self.client.clone(), name).map_err(cfg_err)?;
        Ok(rustls::Connection::Client(c))
    }

    /// A server connection requiring a client certificate from the CA.
    pub fn server_conn(&self) -> Result<rustls::Connection> {
        let c = ServerConnection::new(self.server.clone()).map_err(cfg_err)?;
        Ok(rustls::Connection::Server(c))
    }
}

/// Whether `cert` is valid for `role`'s DNS name (its chain is checked by the handshake).
pub fn cert_is_for(cert: &CertificateDer<'_>, role: Role) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(role.dns_name()) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Who the peer of a completed handshake is, for logs: `sha256:` and the first 16 hex digits of
/// its certificate's fingerprint (every client of a service holds a P1 certificate; the
/// fingerprint tells them apart without parsing names).
pub fn peer_fingerprint(conn: &rustls::Connection) -> Option<String> {
    use sha2::{Digest, Sha256};
    let leaf = conn.peer_certificates()?.first()?;
    let d = Sha256::digest(leaf.as_ref());
    Some(format!(
        "sha256:{}",
        d[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// The role of the peer of a completed handshake, from its verified certificate: the one role
/// of `allowed` the leaf is valid for (`None` if none, or if it names more than one).
pub fn peer_role(conn: &rustls::Connection, allowed: &[Role]) -> Option<Role> {
    let leaf = conn.peer_certificates()?.first()?;
    let mut found = allowed.iter().copied().filter(|r| cert_is_for(leaf, *r));
    let role = found.next()?;
    found.next().is_none().then_some(role)
}

// ---------------------------------------------------------------------------------------------
// Generation (`mpc certs`).
// ---------------------------------------------------------------------------------------------

/// Days a generated set is valid (from yesterday, against clock skew).
pub const VALID_DAYS: i64 = 365;

/// A CA and one certificate and key per role, as PEM text. `Debug` omits the keys.
pub struct CertSet {
    pub ca_pem: String,
    /// `(role, certificate PEM, key PEM)` for P0, P1 and the dealer.
    pub roles: Vec<(Role, String, String)>,
}

impl fmt::Debug for CertSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles: Vec<Role> = self.roles.iter().map(|r| r.0).collect();
        f.debug_struct("CertSet")
            .field("roles", &roles)
            .finish_non_exhaustive()
    }
}

/// (year, month, day) of the civil date `days` after 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

fn validity(params: &mut CertificateParams) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0);
    let at = |days: i64| {
        let (y, m, d) = civil_from_days(days);
        rcgen::date_time_ymd(y, m, d)
    };
    params.not_before = at(today - 1);
    params.not_after = at(today + VALID_DAYS);
}

fn gen_err(e: rcgen::Error) -> MpcError {
    cfg_err(format_args!("generating certificates: {e}"))
}

impl CertSet {
    /// A fresh CA (its key dropped afterwards) and certificates for every role.
    pub fn generate() -> Result<Self> {
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        ca.distinguished_name
            .push(DnType::CommonName, "mpcformer MPC CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut ca);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(gen_err)?)
            .map_err(gen_err)?;
        let mut roles = Vec::new();
        for role in Role::ALL {
            let mut p =
                CertificateParams::new(vec![role.dns_name().to_string()]).map_err(gen_err)?;
            p.distinguished_name
                .push(DnType::CommonName, role.dns_name());
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            // P0 is a server (to P1) and a client (to the dealer); one profile for every role.
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            validity(&mut p);
            let key = KeyPair::generate().map_err(gen_err)?;
            let cert = p.signed_by(&key, &ca).map_err(gen_err)?;
            roles.push((role, cert.pem(), key.serialize_pem()));
        }
        Ok(Self {
            ca_pem: ca.pem(),
            roles,
        })
    }

    /// `role`'s identity from this set.
    pub fn identity(&self, role: Role) -> Result<TlsIdentity> {
        let (_, cert, key) = self
            .roles
            .iter()
            .find(|r| r.0 == role)
            .ok_or_else(|| cfg_err(format_args!("no certificate for {role}")))?;
        TlsIdentity::from_pem(
            role,
            self.ca_pem.as_bytes(),
            cert.as_bytes(),
            key.as_bytes(),
        )
    }

    /// Writes the set into `dir` (created if missing) in the layout above. Refuses to replace an
    /// existing key unless `force`: a replaced key silently breaks the other machines' copies.
    pub fn write_dir(&self, dir: &Path, force: bool) -> Result<Vec<PathBuf>> {
        let io = |p: &Path, e: std::io::Error| cfg_err(format_args!("{}: {e}", p.display()));
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        if !force {
            for (role, _, _) in &self.roles {
                let key = CertPaths::in_dir(dir, *role).key;
                if key.exists() {
                    return Err(cfg_err(format_args!(
                        "{} exists; pass --force to replace every certificate and key in {}",
                        key.display(),
                        dir.display()
                    )));
                }
            }
        }
        let mut written = vec![dir.join(CA_FILE)];
        write_file_atomic(&written[0], self.ca_pem.as_bytes(), 0o644)?;
        for (role, cert, key) in &self.roles {
            let p = CertPaths::in_dir(dir, *role);
            write_file_atomic(&p.cert, cert.as_bytes(), 0o644)?;
            write_file_atomic(&p.key, key.as_bytes(), 0o600)?;
            written.extend([p.cert, p.key]);
        }
        Ok(written)
    }
}

/// Writes `bytes` to a temporary file in `path`'s directory, created with `mode` (so a key is
/// never readable by others, not even briefly), synced, then renamed over `path`.
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let io = |e: std::io::Error| cfg_err(format_args!("writing {}: {e}", path.display()));
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut b = tempfile::Builder::new();
    b.prefix(".mpcformer-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut tmp = b.tempfile_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn generated_certificates_carry_their_roles() {
        let set = CertSet::generate().unwrap();
        for role in Role::ALL {
            let id = set.identity(role).unwrap();
            assert_eq!(id.role(), role);
            let (_, cert, _) = set.roles.iter().find(|r| r.0 == role).unwrap();
            let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
            for other in Role::ALL {
                assert_eq!(cert_is_for(&der, other), other == role);
            }
        }
        // P1's certificate loaded as P0's is refused at load time.
        let (_, c1, k1) = set.roles.iter().find(|r| r.0 == Role::P1).unwrap();
        let e = TlsIdentity::from_pem(
            Role::P0,
            set.ca_pem.as_bytes(),
            c1.as_bytes(),
            k1.as_bytes(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not P0's"), "{e}");
        assert!(!format!("{set:?}").contains("PRIVATE"));
    }

    #[test]
    fn write_dir_keys_are_private_and_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let set = CertSet::generate().unwrap();
        let files = set.write_dir(&dir, false).unwrap();
        assert_eq!(files.len(), 7);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("p0.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let before = std::fs::read(dir.join("p1.key")).unwrap();
        let e = CertSet::generate()
            .unwrap()
            .write_dir(&dir, false)
            .unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(std::fs::read(dir.join("p1.key")).unwrap(), before);
        CertSet::generate().unwrap().write_dir(&dir, true).unwrap();
        assert_ne!(std::fs::read(dir.join("p1.key")).unwrap(), before);
        let id = TlsIdentity::load(Role::Dealer, &CertPaths::in_dir(&dir, Role::Dealer)).unwrap();
        assert_eq!(format!("{id:?}"), "TlsIdentity { role: Dealer, .. }");
    }
}
