//! `fleet`: the user's command. `keygen` makes a tenant key; `infer` signs and sends texts and
//! prints the answer as JSON; `submit` embeds a file of rows, resumably; `results get` reads a
//! stored result; `dlq list|show|replay` reads and replays dead letters; `tenant` manages tenants and
//! their keys in the key store; `nats-user` makes a NATS identity for the shipped broker
//! configuration (`ops/nats/`).

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::PathBuf, time::Duration};

use anyhow::Context;
use async_nats::ConnectOptions;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum, error::ErrorKind};
use fleet_client::{
    CallerArgs, ClientError, RetryPolicy,
    bulk::{self, BulkOptions, Files, Format},
    dlq::DeadLetters,
    infer, stored_result,
};
use fleet_keys::{
    Change, FileSource, KeyStoreArgs, NewKey, Retire, Tenant, TenantAdmin, TenantPolicy,
    VaultConfig, VaultSource,
};
use fleet_schemas::{
    InvalidName, ResultStatus, SecretKeyFile, SigningKey, SubmitStatus, now_ms, validate_name,
};
use fleet_service::{NatsArgs, positive_duration};

#[path = "fleet/progress.rs"]
mod progress;

/// Fleet's command-line client.
#[derive(Debug, Parser)]
#[command(name = "fleet", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: fleet_service::LogArgs,
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
    /// Manages tenants and their keys in the key store the dispatcher and workers read (the
    /// tenants file, or Vault with --tenants-from-vault); they pick changes up without a restart.
    Tenant {
        #[command(flatten)]
        store: KeyStoreArgs,
        #[command(subcommand)]
        action: TenantAction,
    },
    /// Embeds a file of rows (JSON lines or Parquet) into a file of embeddings, one output row
    /// per input row in input order; re-run with the same arguments after a kill, it goes on
    /// where it stopped and sends nothing already answered.
    #[command(
        after_help = "Output rows (JSON lines): {\"id\", \"status\": \"ok\", \"vector\"} or \
        {\"id\", \"status\": \"failed\", \"code\", \"message\"}; Parquet: columns id, vector \
        (list of float32), status, code, message. A Parquet output is committed in parts under \
        <output>.parts/ and becomes one file at the end. The failed rows are also in --errors \
        (JSON lines). Progress goes to stderr; a summary always ends the run. Exit status: 0 \
        every row embedded; 4 some rows failed; 1 an error (the output so far stays valid: run \
        again to go on)."
    )]
    Submit(Box<SubmitArgs>),
    /// Reads the dead-letter stream and runs a dead letter's job again (needs the fleet's
    /// rights: an operator's NATS user under the shipped broker configuration).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Reads stored results of the tenant's jobs.
    Results {
        #[command(subcommand)]
        action: ResultsAction,
    },
    /// Makes a NATS user (an nkey) for the shipped broker configuration: writes its seed (mode
    /// 0600) for the process or tenant that connects with it, and prints its `users.list` line
    /// (`ROLE NAME PUBLIC-NKEY`; append it, then run `ops/nats/render.sh`).
    NatsUser {
        /// What the user may do on the broker.
        #[arg(long, env = "FLEET_NATS_ROLE")]
        role: NatsRole,
        /// The user's name; for a tenant, the tenant's name.
        #[arg(long, env = "FLEET_NATS_NAME")]
        name: String,
        #[command(flatten)]
        seed: NatsSeedArgs,
    },
    /// Embeds texts through request-reply and prints the result as JSON.
    #[command(
        after_help = "Exit status: 0 embedded; 3 refused by the dispatcher (nothing \
        queued); 4 failed in the fleet; 5 no answer in time (retrying with the same --job-id is \
        safe: a job id is queued once, and a repeated call gets the first one's result); 2 a \
        usage error; 1 any other error (key file, connection)."
    )]
    Infer {
        #[command(flatten)]
        caller: Box<CallerArgs>,
        /// A text to embed, taken as it is (repeat for several; the environment holds one).
        #[arg(
            long = "text",
            env = "FLEET_TEXT",
            required_unless_present = "texts_file"
        )]
        texts: Vec<String>,
        /// A file of texts to embed, one per line (`-`: standard input); after any --text.
        #[arg(long, env = "FLEET_TEXTS_FILE")]
        texts_file: Option<PathBuf>,
        /// The job's id (default: a random one). Give one to retry a call safely.
        #[arg(long, env = "FLEET_JOB_ID", value_parser = job_id)]
        job_id: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, env = "FLEET_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, clap::Args)]
struct SubmitArgs {
    #[command(flatten)]
    caller: CallerArgs,
    /// Input rows, JSON lines or Parquet (`-`: standard input, JSON lines only).
    #[arg(long, env = "FLEET_INPUT")]
    input: PathBuf,
    /// The input's format (default: Parquet for a `.parquet` or `.pq` file, else JSON lines).
    #[arg(long, env = "FLEET_INPUT_FORMAT")]
    input_format: Option<Format>,
    /// Where the embeddings go (appended to when resuming; `-`: standard output, JSON lines,
    /// written whole again by a re-run, which reads the answered jobs back from the fleet).
    #[arg(long, env = "FLEET_OUTPUT")]
    output: PathBuf,
    /// The output's format (default: from its name, as for the input).
    #[arg(long, env = "FLEET_OUTPUT_FORMAT")]
    output_format: Option<Format>,
    /// Where the rows that failed for good go, as JSON lines (default: the output's name +
    /// `.errors`; with `--output -`, only in the output unless given).
    #[arg(long, env = "FLEET_ERRORS")]
    errors: Option<PathBuf>,
    /// The input field (or Parquet column) holding a row's id (copied to its output row).
    #[arg(long, env = "FLEET_ID_FIELD", default_value = "id")]
    id_field: String,
    /// The input field (or Parquet column) holding the text to embed.
    #[arg(long, env = "FLEET_TEXT_FIELD", default_value = "text")]
    text_field: String,
    /// Rows per job.
    #[arg(long, env = "FLEET_TEXTS_PER_JOB", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=256))]
    texts_per_job: u64,
    /// Jobs awaiting their result at once.
    #[arg(long, env = "FLEET_IN_FLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    in_flight: u64,
    /// How long to wait for one job's result before submitting it again (same id).
    #[arg(long, env = "FLEET_JOB_TIMEOUT", default_value = "2m", value_parser = positive_duration)]
    job_timeout: Duration,
    /// Attempts per job before its rows are given up.
    #[arg(long, env = "FLEET_MAX_ATTEMPTS", default_value_t = 8)]
    max_attempts: u32,
    /// Parquet output: rows per committed part (rounded up to whole jobs). A kill loses at
    /// most the part being gathered, whose results the re-run reads back from the fleet.
    #[arg(long, env = "FLEET_ROWS_PER_PART", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    rows_per_part: u64,
    /// The progress bar on stderr: `auto` only when stderr is a terminal, `always` (a line a
    /// second when stderr is not a terminal), `never`.
    #[arg(long, env = "FLEET_PROGRESS", default_value = "auto")]
    progress: progress::When,
}

#[derive(Debug, Subcommand)]
enum TenantAction {
    /// Adds a tenant with a first key, and writes that key's secret file (mode 0600).
    Add {
        #[command(flatten)]
        key: NewKeyArgs,
        /// Models the tenant may use (comma-separated; `*` for every served model).
        #[arg(
            long,
            env = "FLEET_TENANT_MODELS",
            value_delimiter = ',',
            default_value = "*"
        )]
        models: Vec<String>,
        /// Sustained jobs per second.
        #[arg(long, env = "FLEET_TENANT_RATE", default_value_t = 100)]
        rate_per_second: u32,
        /// Jobs accepted at once above the sustained rate.
        #[arg(long, env = "FLEET_TENANT_BURST", default_value_t = 200)]
        burst: u32,
        /// Also make the tenant's NATS user: its nkey seed goes to this file (mode 0600) and
        /// its `users.list` line (`tenant NAME PUBLIC-NKEY`) to stdout.
        #[arg(long, env = "FLEET_NATS_SEED_OUT")]
        nats_seed_out: Option<PathBuf>,
    },
    /// Adds a key to a tenant (rotation), writes its secret file, and optionally ends an old key.
    Rotate {
        #[command(flatten)]
        key: NewKeyArgs,
        /// An old key of the tenant to retire: jobs it signs from --retire-after on are refused.
        #[arg(long, env = "FLEET_RETIRE_KEY_ID")]
        retire: Option<String>,
        /// How long the retired key stays valid, so its clients can move to the new one.
        #[arg(long, env = "FLEET_RETIRE_AFTER", default_value = "1h", value_parser = humantime::parse_duration)]
        retire_after: Duration,
    },
    /// Revokes a key at once: every job it signed is refused, queued ones included.
    Revoke {
        #[arg(long, env = "FLEET_KEY_ID")]
        key_id: String,
    },
    /// Prints every tenant, its policy and its keys as JSON.
    List,
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Prints dead letters, one JSON object per line: sequence, time, code, reason, tenant, job.
    List {
        #[command(flatten)]
        nats: NatsArgs,
        /// The first sequence to list.
        #[arg(long, env = "FLEET_DLQ_FROM", default_value_t = 1)]
        from: u64,
        /// The most to list.
        #[arg(long, env = "FLEET_DLQ_LIMIT", default_value_t = 100)]
        limit: usize,
    },
    /// Prints one dead letter in full, its job's texts included.
    Show {
        #[command(flatten)]
        nats: NatsArgs,
        /// Its sequence on the dead-letter stream.
        seq: u64,
    },
    /// Submits a dead letter's job again under a new id, signed with its tenant's key (--key);
    /// the dead letter stays as the record.
    Replay {
        #[command(flatten)]
        caller: Box<CallerArgs>,
        /// Its sequence on the dead-letter stream.
        seq: u64,
        /// How long to wait for the dispatcher's answer.
        #[arg(long, env = "FLEET_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum ResultsAction {
    /// Prints one job's stored result as JSON (exit status 5 when there is none yet).
    Get {
        #[command(flatten)]
        caller: Box<CallerArgs>,
        /// The job's id.
        #[arg(value_parser = job_id)]
        job_id: String,
    },
}

/// The roles of `ops/nats/roles/` (operators have no limits).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum NatsRole {
    Dispatcher,
    Worker,
    Operator,
    Tenant,
}

#[derive(Debug, clap::Args)]
struct NatsSeedArgs {
    /// Where to write the user's nkey seed (it must not exist yet); give it to the process
    /// with `--nats-nkey-file`.
    #[arg(long, env = "FLEET_NATS_SEED_OUT")]
    seed_out: PathBuf,
}

/// A new key of a tenant.
#[derive(Debug, clap::Args)]
struct NewKeyArgs {
    /// Tenant the key speaks for.
    #[arg(long, env = "FLEET_TENANT")]
    tenant: String,
    /// Key id (default: <tenant>-<random>).
    #[arg(long, env = "FLEET_KEY_ID")]
    key_id: Option<String>,
    /// Where to write the secret key (it must not exist yet).
    #[arg(long, env = "FLEET_KEY")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Warnings on stderr; with --log-es-url, the audit events of tenant changes shipped too.
    let logging = fleet_service::init_cli_logging(&cli.log, "fleet")?;
    let ran = run(cli.command).await;
    // A command is short: what it logged is sent before it exits.
    logging.shutdown().await;
    ran
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen {
            tenant,
            key_id,
            out,
        } => keygen(tenant, key_id, out),
        Command::NatsUser { role, name, seed } => {
            let role = role
                .to_possible_value()
                .map(|value| value.get_name().to_owned())
                .unwrap_or_default();
            println!("{}", make_nats_user(&role, &name, &seed.seed_out)?);
            Ok(())
        }
        Command::Submit(args) => submit(*args).await,
        Command::Dlq { action } => dead_letters(action).await,
        Command::Results {
            action: ResultsAction::Get { caller, job_id },
        } => {
            let (tenant, client) = caller.connect().await?;
            match stored_result(&client, &tenant.name, &job_id).await? {
                Some(result) => {
                    println!("{}", serde_json::to_string(&result)?);
                    Ok(())
                }
                None => {
                    eprintln!(
                        "no stored result for job {job_id} of tenant {}",
                        tenant.name
                    );
                    std::process::exit(EXIT_NO_ANSWER);
                }
            }
        }
        Command::Tenant { store, action } => {
            if store.tenants_from_vault {
                let source = VaultSource::new(VaultConfig::from_env()?)?;
                manage_tenants(source, action).await
            } else {
                manage_tenants(FileSource::new(&store.tenants), action).await
            }
        }
        Command::Infer {
            caller,
            mut texts,
            texts_file,
            job_id,
            timeout,
        } => {
            if let Some(path) = texts_file {
                texts.extend(read_texts(&path)?);
            }
            if texts.is_empty() {
                Cli::command()
                    .error(ErrorKind::MissingRequiredArgument, "no text to embed")
                    .exit();
            }
            let (tenant, client) = caller.connect().await?;
            let mut job = tenant.embed_job(&caller.model, texts);
            if let Some(job_id) = job_id {
                job.job_id = job_id;
            }
            let result = match infer(&client, &tenant, &job, timeout).await {
                Ok(result) => result,
                Err(error @ ClientError::TimedOut { .. }) => {
                    eprintln!("{error}; job id {} (retry with --job-id {0})", job.job_id);
                    std::process::exit(EXIT_NO_ANSWER);
                }
                Err(error) => return Err(error.into()),
            };
            println!("{}", serde_json::to_string(&result)?);
            match result.status {
                ResultStatus::Ok => Ok(()),
                ResultStatus::Rejected => std::process::exit(EXIT_REFUSED),
                ResultStatus::Failed => std::process::exit(EXIT_FAILED),
            }
        }
    }
}

/// `fleet submit`: the library's [`bulk::submit_file`] with a progress bar and a summary.
async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let output_format = args
        .output_format
        .unwrap_or_else(|| Format::of_path(&args.output));
    let errors = match args.errors {
        Some(errors) => Some(errors),
        None if args.output.as_os_str() == "-" => None,
        None => Some(PathBuf::from(format!("{}.errors", args.output.display()))),
    };
    let files = Files {
        input_format: args
            .input_format
            .unwrap_or_else(|| Format::of_path(&args.input)),
        input: args.input,
        id_field: args.id_field,
        text_field: args.text_field,
        output: args.output,
        output_format,
        errors: errors.clone(),
        rows_per_part: usize::try_from(args.rows_per_part).unwrap_or(usize::MAX),
    };
    let options = BulkOptions {
        model: args.caller.model.clone(),
        texts_per_job: usize::try_from(args.texts_per_job).unwrap_or(1),
        in_flight: usize::try_from(args.in_flight).unwrap_or(1),
        retry: RetryPolicy {
            attempts: args.max_attempts,
            timeout: args.job_timeout,
            ..RetryPolicy::default()
        },
    };
    let bar = progress::Bar::new(args.progress, || files.count_input_rows())?;
    let (tenant, client) = args.caller.connect().await?;
    let summary = bulk::submit_file(&client, &tenant, &files, &options, &mut |summary| {
        bar.show(summary)
    })
    .await;
    let summary = bar.finish(summary)?;
    eprintln!("{}", serde_json::to_string(&summary)?);
    if summary.rows_failed_in_output > 0 {
        if let Some(errors) = errors {
            eprintln!("rows that failed: {}", errors.display());
        }
        std::process::exit(EXIT_FAILED);
    }
    Ok(())
}

async fn dead_letters(action: DlqAction) -> anyhow::Result<()> {
    match action {
        DlqAction::List { nats, from, limit } => {
            let client = nats.connect(ConnectOptions::new()).await?;
            for letter in DeadLetters::open(&client).await?.list(from, limit).await? {
                println!("{letter}");
            }
        }
        DlqAction::Show { nats, seq } => {
            let client = nats.connect(ConnectOptions::new()).await?;
            let letter = DeadLetters::open(&client).await?.show(seq).await?;
            println!("{}", serde_json::to_string_pretty(&letter)?);
        }
        DlqAction::Replay {
            caller,
            seq,
            timeout,
        } => {
            let (tenant, client) = caller.connect().await?;
            let letters = DeadLetters::open(&client).await?;
            let (job, reply) = letters.replay(&client, &tenant, seq, timeout).await?;
            eprintln!(
                "dead letter {seq} submitted again as job {} of tenant {} ({:?})",
                job.job_id, job.tenant, reply.status
            );
            println!("{}", serde_json::to_string(&reply)?);
            if reply.status == SubmitStatus::Rejected {
                std::process::exit(EXIT_REFUSED);
            }
        }
    }
    Ok(())
}

/// `fleet infer`'s exit status when the dispatcher refused the job.
const EXIT_REFUSED: i32 = 3;
/// ... when the job failed in the fleet.
const EXIT_FAILED: i32 = 4;
/// ... when no answer came in time (and `results get` when there is no result).
const EXIT_NO_ANSWER: i32 = 5;

/// A job id as the dispatcher accepts it.
fn job_id(value: &str) -> Result<String, InvalidName> {
    validate_name("job id", value)?;
    Ok(value.to_owned())
}

/// The lines of `path` (`-`: standard input), each a text.
fn read_texts(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let contents = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read texts from stdin")?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read texts from {}", path.display()))?
    };
    Ok(contents.lines().map(str::to_owned).collect())
}

async fn manage_tenants<S: TenantAdmin>(source: S, action: TenantAction) -> anyhow::Result<()> {
    let change = match action {
        TenantAction::List => {
            let tenants = source.load().await?;
            let listed: Vec<_> = tenants.iter().map(|tenant| tenant_json(tenant)).collect();
            println!("{}", serde_json::to_string_pretty(&listed)?);
            return Ok(());
        }
        TenantAction::Revoke { key_id } => Change::Revoke { key_id },
        TenantAction::Add {
            key,
            models,
            rate_per_second,
            burst,
            nats_seed_out,
        } => {
            let (new_key, out) = write_new_key(&key)?;
            let users_line = match &nats_seed_out {
                Some(seed_out) => match make_nats_user("tenant", &key.tenant, seed_out) {
                    Ok(line) => Some(line),
                    Err(error) => {
                        let _ = std::fs::remove_file(&out);
                        return Err(error);
                    }
                },
                None => None,
            };
            let change = Change::AddTenant {
                tenant: key.tenant.clone(),
                policy: TenantPolicy {
                    models,
                    rate_per_second,
                    burst,
                },
                key: new_key,
            };
            let applied = apply_with_key(&source, change, &out).await;
            match (&applied, nats_seed_out, users_line) {
                (Ok(()), Some(seed_out), Some(line)) => {
                    eprintln!(
                        "its NATS seed is in {}; append the line printed on stdout to the \
                         broker's users.list and run ops/nats/render.sh",
                        seed_out.display()
                    );
                    println!("{line}");
                }
                (Err(_), Some(seed_out), _) => {
                    let _ = std::fs::remove_file(seed_out);
                }
                _ => {}
            }
            return applied;
        }
        TenantAction::Rotate {
            key,
            retire,
            retire_after,
        } => {
            let (new_key, out) = write_new_key(&key)?;
            let not_after_ms = now_ms().saturating_add(retire_after.as_millis() as u64);
            let change = Change::AddKey {
                tenant: key.tenant.clone(),
                key: new_key,
                retire: retire.map(|key_id| Retire {
                    key_id,
                    not_after_ms,
                }),
            };
            return apply_with_key(&source, change, &out).await;
        }
    };
    apply_audited(&source, change).await?;
    eprintln!("{}: done", source.describe());
    Ok(())
}

/// Applies a change and writes its audit event (`fleet::audit`, shipped to the audit index with
/// --log-es-url): which tenant and key, in which store, by which user, applied or refused. Key
/// ids only: never a key, public or secret.
async fn apply_audited<S: TenantAdmin>(
    source: &S,
    change: Change,
) -> Result<(), fleet_keys::AdminError> {
    let (action, tenant, key_id, retired_key_id) = match &change {
        Change::AddTenant { tenant, key, .. } => (
            "tenant_added",
            Some(tenant.clone()),
            key.key_id.clone(),
            None,
        ),
        Change::AddKey {
            tenant,
            key,
            retire,
        } => (
            "key_added",
            Some(tenant.clone()),
            key.key_id.clone(),
            retire.as_ref().map(|retire| retire.key_id.clone()),
        ),
        Change::Retire(retire) => ("key_retired", None, retire.key_id.clone(), None),
        Change::Revoke { key_id } => ("key_revoked", None, key_id.clone(), None),
    };
    let applied = source.apply(change).await;
    let outcome = if applied.is_ok() {
        "applied"
    } else {
        "refused"
    };
    let user = std::env::var("USER").ok();
    tracing::info!(target: fleet_service::AUDIT_TARGET, action, outcome,
        tenant = tenant.as_deref(), key_id = key_id.as_str(),
        retired_key_id = retired_key_id.as_deref(), store = %source.describe(),
        user = user.as_deref(), "tenant change");
    applied
}

/// Applies a change that registers a key whose secret was just written to `out`; a refused
/// change leaves no key file behind.
async fn apply_with_key<S: TenantAdmin>(
    source: &S,
    change: Change,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    if let Err(error) = apply_audited(source, change).await {
        let _ = std::fs::remove_file(out);
        return Err(error.into());
    }
    eprintln!(
        "{}: key registered; its secret key is in {}",
        source.describe(),
        out.display()
    );
    Ok(())
}

/// Makes a key for `args.tenant`, writes its secret file, and returns the public half.
fn write_new_key(args: &NewKeyArgs) -> anyhow::Result<(NewKey, PathBuf)> {
    let key = write_key_file(&args.tenant, args.key_id.clone(), &args.out)?;
    Ok((
        NewKey::new(key.key_id.clone(), key.verifying_key()),
        args.out.clone(),
    ))
}

fn tenant_json(tenant: &Tenant) -> serde_json::Value {
    let keys: Vec<_> = tenant
        .keys
        .iter()
        .map(|key| {
            serde_json::json!({
                "key_id": key.key_id,
                "public_key": key.public_key.to_hex(),
                "not_before_ms": key.not_before_ms,
                "not_after_ms": key.not_after_ms,
                "revoked": key.revoked,
            })
        })
        .collect();
    serde_json::json!({
        "name": tenant.name,
        "models": tenant.policy.models,
        "rate_per_second": tenant.policy.rate_per_second,
        "burst": tenant.policy.burst,
        "keys": keys,
    })
}

fn keygen(tenant: String, key_id: Option<String>, out: PathBuf) -> anyhow::Result<()> {
    let key = write_key_file(&tenant, key_id, &out)?;
    let key_id = key.key_id.clone();
    eprintln!(
        "secret key written to {}; append the entry printed on stdout to the dispatcher's tenants \
         file (`>> tenants.toml`: for a tenant already there it adds this key)",
        out.display()
    );
    println!(
        "[[tenants]]\nname = \"{tenant}\"\nmodels = [\"*\"]\nrate_per_second = 100\nburst = 200\n\
         keys = [{{ key_id = \"{key_id}\", public_key = \"{}\" }}]",
        key.verifying_key().to_hex()
    );
    Ok(())
}

/// Makes a key pair for `tenant` and writes its secret key file.
fn write_key_file(
    tenant: &str,
    key_id: Option<String>,
    out: &std::path::Path,
) -> anyhow::Result<SigningKey> {
    validate_name("tenant", tenant)?;
    let key_id = key_id.unwrap_or_else(|| format!("{tenant}-{:08x}", rand::random::<u32>()));
    validate_name("key id", &key_id)?;
    let key = SigningKey::generate(key_id.clone());
    let file = SecretKeyFile {
        tenant: tenant.to_owned(),
        key_id: key_id.clone(),
        secret_key: key.secret_hex(),
    };
    write_secret_file(out, toml::to_string(&file)?.as_bytes())?;
    Ok(key)
}

/// Makes a NATS user nkey, writes its seed to `out`, and returns its `users.list` line.
fn make_nats_user(role: &str, name: &str, out: &std::path::Path) -> anyhow::Result<String> {
    validate_name("NATS user name", name)?;
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().context("a new user nkey has a seed")?;
    write_secret_file(out, format!("{seed}\n").as_bytes())?;
    Ok(format!("{role} {name} {}", user.public_key()))
}

/// Writes a secret to a new file only its owner reads (mode 0600, never over an existing file,
/// removed again if the write fails: a partial file would block the next attempt).
fn write_secret_file(out: &std::path::Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
    let written = handle.write_all(contents).and_then(|()| handle.sync_all());
    if let Err(error) = written {
        let _ = std::fs::remove_file(out);
        return Err(error).with_context(|| format!("cannot write {}", out.display()));
    }
    Ok(())
}
