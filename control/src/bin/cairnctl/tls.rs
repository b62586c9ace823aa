//! cairnctl's TLS: the flags that make its links to cairn-node and cairn-control mutual TLS
//! (`--tls-ca/--tls-cert/--tls-key`, or `--tls-dir DIR` for a directory `cert issue` wrote),
//! where it looks when none is given, and `cairnctl cert init|issue`, which create a cluster
//! CA and the certificates of its nodes, control processes and operators (docs/security.md).
//!
//! With no flag, cairnctl takes `$CAIRN_TLS_DIR`; a command for the control process
//! (`volume …`, `node ls`) then also looks for the admin identity `cairn up` issues in
//! `./cairn-data` ([`CAIRN_UP_ADMIN_DIR`]); else it runs without TLS. A command for one node's
//! admin API does not look there: a lone plain node started in the same directory (the
//! README's `cairn-node --data-dir ./cairn-data`) must not be dialled with TLS.

use anyhow::{Context, Result};
use cairn_tls::{issue, Identity, Tls, TlsFiles};
use clap::{ArgGroup, Args, Subcommand};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The environment variable naming a certificate directory (like `--tls-dir`).
pub const TLS_DIR_ENV: &str = "CAIRN_TLS_DIR";
/// Where `cairn up` (default data directory) writes the admin identity cairnctl uses.
pub const CAIRN_UP_ADMIN_DIR: &str = "cairn-data/tls/admin-cairn";

#[derive(Args, Default)]
pub struct TlsArgs {
    /// The cluster CA's certificate (PEM); with --tls-cert and --tls-key (all three or none)
    /// cairnctl speaks mutual TLS to the node and the control process.
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// cairnctl's certificate (PEM), naming admin:NAME.
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// cairnctl's private key (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// A directory `cairnctl cert issue` wrote: DIR/ca-cert.pem, DIR/cert.pem, DIR/key.pem
    /// [default: $CAIRN_TLS_DIR, else, for `volume` and `node ls`, ./cairn-data/tls/admin-cairn when it exists].
    #[arg(long, global = true, value_name = "DIR", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    tls_dir: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS configuration these flags (or the defaults) name; None for plain TCP.
    /// `cairn_up_default`: whether `cairn up`'s admin identity in `./cairn-data` counts.
    pub fn load(&self, cairn_up_default: bool) -> Result<Option<Tls>> {
        let files = match &self.tls_dir {
            Some(dir) => Some(TlsFiles::in_dir(dir)),
            None => TlsFiles::from_flags(
                self.tls_ca.clone(),
                self.tls_cert.clone(),
                self.tls_key.clone(),
            )?
            .or_else(|| {
                let dir = std::env::var_os(TLS_DIR_ENV)
                    .map(PathBuf::from)
                    .or_else(|| {
                        let up = PathBuf::from(CAIRN_UP_ADMIN_DIR);
                        (cairn_up_default && up.join(cairn_tls::CERT_FILE).exists()).then_some(up)
                    })?;
                Some(TlsFiles::in_dir(&dir))
            }),
        };
        files
            .map(|f| Tls::load(&f).context("loading cairnctl's TLS certificate"))
            .transpose()
    }
}

/// The control process's URL: the one given, else the default on this machine (https when
/// cairnctl has TLS).
pub fn control_url(given: Option<&str>, tls: Option<&Tls>) -> String {
    match (given, tls) {
        (Some(url), _) => url.to_string(),
        (None, Some(_)) => {
            cairn_control_api::CONTROL_URL_DEFAULT.replacen("http://", "https://", 1)
        }
        (None, None) => cairn_control_api::CONTROL_URL_DEFAULT.to_string(),
    }
}

#[derive(Args)]
pub struct CertArgs {
    #[command(subcommand)]
    cmd: CertCmd,
}

#[derive(Subcommand)]
enum CertCmd {
    /// Create a cluster CA in DIR (made 0700; its key stays there, 0600).
    Init { dir: PathBuf },
    /// Issue a certificate from the CA in DIR, into DIR/node-ID (or control-NAME,
    /// admin-NAME): ca-cert.pem, cert.pem, key.pem.
    #[command(group(ArgGroup::new("identity").required(true).args(["node", "control", "admin"])))]
    Issue {
        dir: PathBuf,
        /// A cairn-node, by its node id (--node-id).
        #[arg(long, value_name = "ID")]
        node: Option<String>,
        /// A cairn-control process.
        #[arg(long, value_name = "NAME")]
        control: Option<String>,
        /// An operator (cairnctl).
        #[arg(long, value_name = "NAME")]
        admin: Option<String>,
        /// An address peers dial to reach it (repeatable; servers need theirs).
        #[arg(long = "addr", value_name = "IP", num_args = 1..)]
        addrs: Vec<IpAddr>,
        /// A host name peers dial to reach it (repeatable).
        #[arg(long = "dns", value_name = "NAME", num_args = 1..)]
        dns: Vec<String>,
    },
}

/// Runs `cairnctl cert …`.
pub fn cert(args: CertArgs) -> Result<()> {
    match args.cmd {
        CertCmd::Init { dir } => {
            issue::init_ca(&dir)?;
            println!("created a cluster CA in {}", dir.display());
        }
        CertCmd::Issue {
            dir,
            node,
            control,
            admin,
            addrs,
            dns,
        } => {
            let identity = match (node, control, admin) {
                (Some(id), _, _) => Identity::Node(id),
                (_, Some(name), _) => Identity::Control(name),
                (_, _, Some(name)) => Identity::Admin(name),
                _ => unreachable!("clap requires one of --node, --control, --admin"),
            };
            let out = issue::issue(&dir, &identity, &addrs, &dns)?;
            print_issued(&identity, &out);
        }
    }
    Ok(())
}

fn print_issued(identity: &Identity, out: &Path) {
    println!(
        "issued {identity} in {0}: --tls-ca {0}/{1} --tls-cert {0}/{2} --tls-key {0}/{3}",
        out.display(),
        cairn_tls::CA_CERT_FILE,
        cairn_tls::CERT_FILE,
        cairn_tls::KEY_FILE
    );
}
