//! `fleet`: the user's command. `keygen` makes a tenant key; `infer` signs and sends texts and
//! prints the answer as JSON.

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_client::{CallerArgs, infer};
use fleet_schemas::{SecretKeyFile, SigningKey, validate_name};

/// Fleet's command-line client.
#[derive(Debug, Parser)]
#[command(name = "fleet", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Makes a key pair: writes the secret key file (mode 0600) and prints the tenants-file entry
    /// (append it to the tenants file; for a tenant already there it adds a key).
    Keygen {
        /// Tenant the key speaks for.
        #[arg(long, env = "FLEET_TENANT")]
        tenant: String,
        /// Key id (default: <tenant>-<random>).
        #[arg(long, env = "FLEET_KEY_ID")]
        key_id: Option<String>,
        /// Where to write the secret key.
        #[arg(long, env = "FLEET_KEY", default_value = "fleet-key.toml")]
        out: PathBuf,
    },
    /// Embeds texts through request-reply and prints the result as JSON.
    Infer {
        #[command(flatten)]
        caller: Box<CallerArgs>,
        /// A text to embed (repeat for several; the environment holds one).
        #[arg(long = "text", env = "FLEET_TEXT", required = true)]
        texts: Vec<String>,
        /// How long to wait for the answer, in seconds.
        #[arg(long, env = "FLEET_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        timeout_secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Keygen {
            tenant,
            key_id,
            out,
        } => keygen(tenant, key_id, out),
        Command::Infer {
            caller,
            texts,
            timeout_secs,
        } => {
            let (tenant, client) = caller.connect().await?;
            let job = tenant.embed_job(&caller.model, texts);
            let result = infer(&client, &tenant, &job, Duration::from_secs(timeout_secs)).await?;
            println!("{}", serde_json::to_string(&result)?);
            if result.error.is_some() {
                std::process::exit(2);
            }
            Ok(())
        }
    }
}

fn keygen(tenant: String, key_id: Option<String>, out: PathBuf) -> anyhow::Result<()> {
    validate_name("tenant", &tenant)?;
    let key_id = key_id.unwrap_or_else(|| format!("{tenant}-{:08x}", rand::random::<u32>()));
    validate_name("key id", &key_id)?;
    let key = SigningKey::generate(key_id.clone());
    let file = SecretKeyFile {
        tenant: tenant.clone(),
        key_id: key_id.clone(),
        secret_key: key.secret_hex(),
    };
    let contents = toml::to_string(&file)?;
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&out)
        .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
    let written = handle
        .write_all(contents.as_bytes())
        .and_then(|()| handle.sync_all());
    if let Err(error) = written {
        // A partial key file would block the next attempt (files are never overwritten).
        let _ = std::fs::remove_file(&out);
        return Err(error).with_context(|| format!("cannot write {}", out.display()));
    }
    eprintln!(
        "secret key written to {}; append the entry printed on stdout to the dispatcher's tenants \
         file (`>> tenants.toml`: for a tenant already there it adds this key) and restart the \
         dispatcher",
        out.display()
    );
    println!(
        "[[tenants]]\nname = \"{tenant}\"\nmodels = [\"*\"]\nrate_per_second = 100\nburst = 200\n\
         keys = [{{ key_id = \"{key_id}\", public_key = \"{}\" }}]",
        key.verifying_key().to_hex()
    );
    Ok(())
}
