//! The `teeway` command line: a thin layer over the agent, gateway and command libraries.
//!
//! Exit codes, the same for every subcommand (README, "Exit codes"): 0 success; 1 the command ran
//! and failed (an I/O error, an unreachable replay target, damage found in an archive, a demo
//! whose copies did not match, a server that stopped on an error); 2 the command line or a
//! configuration is invalid (nothing was started).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use teeway::archive_cmd::{self, ConvertTo};
use teeway::replay::{self, Pace, ReplayOptions};
use teeway::{certs, check, demo};

/// Cross-cluster traffic mirroring: tee production requests over mTLS QUIC to shadow services.
#[derive(Debug, Parser)]
#[command(name = "teeway", version = teeway_runtime::build::LONG_VERSION, about)]
struct Cli {
    /// Log line format on stderr: `text` for people, `json` (one object a line) for log pipelines.
    /// Which lines are written is set with RUST_LOG (for example `info`, `teeway_agent=debug`).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "TEEWAY_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent in the production cluster.
    Agent {
        /// Agent configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the gateway in the test cluster.
    Gateway {
        /// Gateway configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate agent or gateway configuration files and list every problem.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Make certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Read archives: summaries and conversions.
    Archive {
        #[command(subcommand)]
        command: ArchiveCommand,
    },
    /// Send archived requests to a target, at the recorded pace or faster.
    Replay(Box<ReplayArgs>),
    /// Compare a new version's answers with a known-good one's, offline: archived requests
    /// replayed to both (or their answers read from the archives), as a gateway's compare
    /// route does.
    Diff(Box<DiffArgs>),
    /// Run primary, agent, gateway and shadow on loopback and show mirroring end to end.
    Demo {
        /// Requests to send.
        #[arg(long, default_value_t = 400)]
        requests: usize,
        /// Keep everything running afterwards and print addresses to try by hand.
        #[arg(long)]
        serve: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ArchiveCommand {
    /// Summarise archives: records, time span, methods, top paths, sizes, skipped records.
    Inspect {
        /// Archive files or directories (native or gor, plain, zstd or gzip).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Read every record of archives and report any damage; exits 1 if any was found.
    Verify {
        /// Archive files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Convert archives into one file of another format.
    Convert {
        /// Output format.
        #[arg(long, value_enum)]
        to: ConvertTo,
        /// Archive files or directories, then the output file (never overwritten).
        #[arg(required = true, num_args = 2..)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("pace").args(["speed", "rate", "max_rate"])))]
struct ReplayArgs {
    /// Where to send the requests: http://host:port or https://host:port; for RPC copies,
    /// redis://host:port, thrift://host:port or dubbo://host:port.
    #[arg(long)]
    target: String,
    /// For an https target: a PEM bundle of the CAs its certificate chains to (default: the
    /// system's CA store).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Recorded gaps divided by this factor (default 1: the recorded pace).
    #[arg(long)]
    speed: Option<f64>,
    /// A fixed rate instead of the recorded pace: requests per second (`200` or `200/s`).
    #[arg(long, value_parser = replay::parse_rate)]
    rate: Option<f64>,
    /// As fast as --concurrency allows.
    #[arg(long)]
    max_rate: bool,
    /// Longest single wait between two requests under --speed.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    max_wait: std::time::Duration,
    /// How many times to go through the archives.
    #[arg(long = "loop", default_value_t = 1)]
    loops: u32,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Only requests whose path matches this regular expression (HTTP).
    #[arg(long)]
    filter_path: Option<regex::Regex>,
    /// Only requests whose method matches this regular expression: an HTTP method, a Redis
    /// command (in capitals), a Thrift or Dubbo method.
    #[arg(long)]
    filter_method: Option<regex::Regex>,
    /// Host header sent: the recorded one (keep) or the target's (target).
    #[arg(long, default_value = "keep", value_parser = ["keep", "target"])]
    host_header: String,
    /// HTTP version to the target: http1, http2 (h2c) or auto (each request's recorded version).
    #[arg(long, default_value = "http1", value_parser = ["http1", "http2", "auto"])]
    protocol: String,
    /// Time allowed for one request and its response.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: std::time::Duration,
    /// Report format on stdout.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    report: String,
    /// No progress on stderr.
    #[arg(long)]
    quiet: bool,
    /// Read, filter and pace the archives and report what would be sent, sending nothing.
    #[arg(long)]
    dry_run: bool,
    /// Also send requests whose body was cut (by the agent's limit, or short of its
    /// Content-Length in a capture), announced at the length they have; default: skip them.
    #[arg(long)]
    replay_truncated: bool,
    /// Archive files or directories (native or gor, plain, zstd or gzip).
    #[arg(required = true)]
    archives: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct DiffArgs {
    /// The new version: http://host:port (with --from-archive, the URL its answers are
    /// archived under).
    #[arg(long)]
    candidate: String,
    /// The last known-good version: http://host:port, or `production` for what production
    /// answered (kept in the archives: the agent's mirror.capture_response, a capture's
    /// original responses).
    #[arg(long)]
    primary: String,
    /// A second instance of the known-good version: what it answers differently from the
    /// primary is noise.
    #[arg(long)]
    secondary: Option<String>,
    /// Read every role's answer from the archives (a gateway's record_responses), replay none.
    #[arg(long)]
    from_archive: bool,
    /// Response headers compared (repeatable; default content-type).
    #[arg(long = "header", value_name = "NAME")]
    headers: Vec<String>,
    /// JSON fields not compared, such as /meta/trace_id or /items/*/updated_at (repeatable).
    #[arg(long = "ignore-field", value_name = "PATH")]
    ignore_fields: Vec<String>,
    /// Values that differ but both match this regular expression are no difference
    /// (repeatable).
    #[arg(long = "ignore-value", value_name = "REGEX")]
    ignore_values: Vec<String>,
    /// JSON arrays compared whatever their order (repeatable).
    #[arg(long = "unordered", value_name = "PATH")]
    unordered: Vec<String>,
    /// Endpoint templates such as "GET /users/{id}", tried before identifiers are folded
    /// (repeatable).
    #[arg(long = "endpoint", value_name = "TEMPLATE")]
    endpoints: Vec<String>,
    /// Body bytes compared per answer.
    #[arg(long, default_value = "1MiB")]
    max_body: String,
    /// Samples kept per endpoint and field (0 to 20).
    #[arg(long, default_value_t = 3)]
    samples: u64,
    /// Write the findings as a web page, static (the gateway's /compare/ui, with no server).
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// Print the findings as JSON (the gateway's /compare) instead of text.
    #[arg(long)]
    json: bool,
    /// Exit 1 when a field is found differing (a likely regression): for a release pipeline.
    #[arg(long)]
    fail_on_differing: bool,
    /// For https targets: a PEM bundle of the CAs their certificates chain to.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Requests replayed at once (each to every role).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Host header sent: the recorded one (keep) or the target's (target).
    #[arg(long, default_value = "keep", value_parser = ["keep", "target"])]
    host_header: String,
    /// HTTP version to the targets: http1, http2 (h2c) or auto (each request's recorded one).
    #[arg(long, default_value = "http1", value_parser = ["http1", "http2", "auto"])]
    protocol: String,
    /// Time allowed for one request and its response.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: std::time::Duration,
    /// No progress on stderr.
    #[arg(long)]
    quiet: bool,
    /// Archive files or directories (native or gor, plain, zstd or gzip).
    #[arg(required = true)]
    archives: Vec<PathBuf>,
}

/// The command ran and failed.
const FAILED: u8 = 1;
/// The command line or a configuration is invalid; nothing was started.
const INVALID: u8 = 2;

/// Writes a line to stdout. A closed pipe (`teeway archive inspect X | head`) ends the output
/// quietly: the reader has what it wanted, and the exit code stays the command's own.
fn out(text: impl std::fmt::Display) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            stderr_line(format_args!("error: cannot write to stdout: {e}"));
        }
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    teeway_runtime::units::parse_duration(text)
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a CA, a gateway certificate and an agent certificate into a folder.
    Init {
        /// Folder to write into.
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name or IP for the gateway certificate (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always covered.
        #[arg(long = "gateway-name")]
        gateway_names: Vec<String>,
        /// The agent's identity, carried in its certificate.
        #[arg(long, default_value = "agent")]
        agent_name: String,
        /// Validity of the gateway and agent certificates, in days (the CA: ten years).
        #[arg(long, default_value_t = teeway_wire::pki::DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Overwrite existing files, the CA included (every certificate it issued stops
        /// verifying).
        #[arg(long)]
        force: bool,
    },
    /// Sign one more agent or gateway certificate with the CA in a folder, the CA untouched.
    Issue {
        /// Folder holding ca.pem and ca.key (from `certs init`); the new files go there.
        #[arg(long)]
        dir: PathBuf,
        /// An agent certificate with this identity: agent-NAME.pem and agent-NAME.key.
        #[arg(long, conflicts_with = "gateway_names")]
        agent_name: Option<String>,
        /// A gateway certificate for these names (repeatable; localhost, 127.0.0.1 and ::1
        /// are always covered): gateway-FIRST.pem and gateway-FIRST.key.
        #[arg(long = "gateway-name")]
        gateway_names: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = teeway_wire::pki::DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Overwrite a certificate and key of the same name (never the CA).
        #[arg(long)]
        force: bool,
    },
}

/// Whether stderr carries JSON lines (`--log-format json`): then errors are JSON lines too.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reports an error that ends the command: a plain line for people, or with `--log-format
/// json` one JSON object (level ERROR), like every other line of the process.
fn report_error(text: impl std::fmt::Display) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        // Written here, not through `tracing`: a RUST_LOG filter must not hide why the process
        // stopped.
        let line = serde_json::json!({
            "timestamp": teeway_archive::har::iso8601(std::time::SystemTime::now()),
            "level": "ERROR",
            "target": "teeway",
            "message": text.to_string(),
        });
        stderr_line(line);
    } else {
        stderr_line(text);
    }
}

/// Writes a line to stderr; a closed stderr (`2>&1 | head`) is not a reason to panic.
fn stderr_line(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default`), in `format`.
fn init_logging(format: LogFormat, default: &str) {
    JSON_LOGS.store(
        matches!(format, LogFormat::Json),
        std::sync::atomic::Ordering::Relaxed,
    );
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Fields at the top level, next to `level`, `target` and `timestamp`, so a pipeline can
        // index `reason` or `identity` without unpacking a nested object.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    teeway_wire::tls::install_default_provider();
    match cli.command {
        Command::Check { files } => {
            init_logging(log_format, "warn");
            let mut failed = false;
            for checked in check::check_files(&files) {
                match &checked.result {
                    Ok(summary) => out(format_args!("{}: ok ({summary})", checked.path.display())),
                    Err(e) => {
                        failed = true;
                        out(e);
                    }
                }
                for warning in &checked.warnings {
                    out(format_args!("  warning: {warning}"));
                }
            }
            if failed {
                ExitCode::from(INVALID)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Certs { command } => {
            init_logging(log_format, "warn");
            let written = match command {
                CertsCommand::Init {
                    dir,
                    gateway_names,
                    agent_name,
                    days,
                    force,
                } => certs::init(&certs::InitOptions {
                    dir,
                    gateway_names,
                    agent_name,
                    force,
                    days,
                }),
                CertsCommand::Issue {
                    dir,
                    agent_name,
                    gateway_names,
                    days,
                    force,
                } => certs::issue(&certs::IssueOptions {
                    dir,
                    agent_name,
                    gateway_names,
                    days,
                    force,
                }),
            };
            match written {
                Ok(paths) => {
                    for p in paths {
                        out(format_args!("wrote {}", p.display()));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => command_failure(&e),
            }
        }
        Command::Agent { config: path } => {
            init_logging(log_format, "info");
            // Validate everything before any port is bound.
            let config = match teeway_agent::AgentConfig::from_file(&path) {
                Ok(c) => c,
                Err(e) => return config_failure(&e, &path, check::Kind::Gateway),
            };
            let text = std::fs::read_to_string(&path).ok();
            let agent = Arc::new(teeway_agent::Agent::with_source(
                config.clone(),
                &teeway_runtime::reload::source_name(&path),
                text.as_deref(),
            ));
            block_on(async move {
                let listeners = teeway_agent::AgentListeners::bind(&config).await?;
                let shutdown = CancellationToken::new();
                teeway_runtime::shutdown::cancel_on_signal(shutdown.clone())?;
                let reloading = agent.clone();
                let tls_files = config.gateway.as_ref().map(|g| g.tls_files.to_vec());
                teeway_runtime::reload::watch(
                    path,
                    tls_files.unwrap_or_default(),
                    agent.config_state(),
                    move |text| reloading.reload_yaml(text, Path::new(".")),
                    shutdown.clone(),
                )?;
                agent.run(listeners, shutdown).await?;
                Ok(())
            })
        }
        Command::Gateway { config: path } => {
            init_logging(log_format, "info");
            let config = match teeway_gateway::GatewayConfig::from_file(&path) {
                Ok(c) => c,
                Err(e) => return config_failure(&e, &path, check::Kind::Agent),
            };
            let text = std::fs::read_to_string(&path).ok();
            let gateway = Arc::new(teeway_gateway::Gateway::with_source(
                config.clone(),
                &teeway_runtime::reload::source_name(&path),
                text.as_deref(),
            ));
            block_on(async move {
                let listeners = teeway_gateway::GatewayListeners::bind(&config).await?;
                let shutdown = CancellationToken::new();
                teeway_runtime::shutdown::cancel_on_signal(shutdown.clone())?;
                let reloading = gateway.clone();
                teeway_runtime::reload::watch(
                    path,
                    config.tls_files.to_vec(),
                    gateway.config_state(),
                    move |text| reloading.reload_yaml(text, Path::new(".")),
                    shutdown.clone(),
                )?;
                gateway.run(listeners, shutdown).await?;
                Ok(())
            })
        }
        Command::Archive { command } => {
            init_logging(log_format, "warn");
            archive_command(command)
        }
        Command::Replay(args) => {
            // The report counts every failure; the gateway's own lines about its replays speak
            // of routes and metrics a replay does not have.
            init_logging(log_format, "warn,teeway_gateway::rpc=error");
            replay_command(*args)
        }
        Command::Diff(args) => {
            init_logging(log_format, "warn,teeway_gateway::rpc=error");
            diff_command(*args)
        }
        Command::Demo { requests, serve } => {
            init_logging(log_format, "warn");
            match runtime()
                .and_then(|rt| rt.block_on(demo::run(demo::DemoOptions { requests, serve })))
            {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(FAILED),
                Err(e) => command_failure(&e),
            }
        }
    }
}

fn archive_command(command: ArchiveCommand) -> ExitCode {
    match command {
        ArchiveCommand::Inspect { paths } => match archive_cmd::inspect(&paths) {
            Ok(summary) => {
                out(format_args!("{}", summary.to_string().trim_end()));
                damage_exit(archive_cmd::damage(&summary.read))
            }
            Err(e) => command_failure(&e),
        },
        ArchiveCommand::Verify { paths } => match archive_cmd::verify(&paths) {
            Ok(verdicts) => {
                let (mut records, mut damaged, mut issues) = (0, 0, 0);
                for v in &verdicts {
                    records += v.records;
                    let open_tail = v.issues.iter().any(|i| !archive_cmd::is_damage(i));
                    let damage: Vec<_> = v
                        .issues
                        .iter()
                        .filter(|i| archive_cmd::is_damage(i))
                        .collect();
                    if damage.is_empty() {
                        let note = if open_tail {
                            "; its last record is still being written"
                        } else {
                            ""
                        };
                        out(format_args!(
                            "ok       {} ({} records{note})",
                            v.path.display(),
                            v.records
                        ));
                        continue;
                    }
                    damaged += 1;
                    issues += damage.len() as u64;
                    out(format_args!(
                        "DAMAGED  {} ({} records read, {} part(s) not)",
                        v.path.display(),
                        v.records,
                        damage.len()
                    ));
                    for issue in damage {
                        out(format_args!("  {issue}"));
                    }
                }
                out(format_args!(
                    "{} file(s), {records} records read, {damaged} file(s) damaged",
                    verdicts.len()
                ));
                damage_exit(issues)
            }
            Err(e) => command_failure(&e),
        },
        ArchiveCommand::Convert { to, mut paths } => {
            let Some(output) = paths.pop() else {
                return ExitCode::from(INVALID);
            };
            match archive_cmd::convert(&paths, to, &output) {
                Ok((written, stats)) => {
                    out(format_args!(
                        "wrote {written} records to {} ({} torn, {} corrupt, {} unreadable skipped)",
                        output.display(),
                        stats.torn,
                        stats.corrupt,
                        stats.unreadable
                    ));
                    damage_exit(archive_cmd::damage(&stats))
                }
                Err(e) => command_failure(&e),
            }
        }
    }
}

/// An error that ends a command: exit code 2 for a bad command line ([`teeway::Usage`]), 1 for
/// anything else; said on stderr (a JSON line with `--log-format json`).
fn command_failure(e: &anyhow::Error) -> ExitCode {
    report_error(format_args!("error: {e:#}"));
    if e.downcast_ref::<teeway::Usage>().is_some() {
        ExitCode::from(INVALID)
    } else {
        ExitCode::from(FAILED)
    }
}

/// Exit code of a command that read archives: 1, with a line on stderr, when parts could not be
/// read (the output above lists them), so a script never takes a damaged archive for a whole one.
fn damage_exit(skipped: u64) -> ExitCode {
    if skipped == 0 {
        return ExitCode::SUCCESS;
    }
    report_error(format_args!(
        "error: {skipped} part(s) of the archive could not be read (listed above)"
    ));
    ExitCode::from(FAILED)
}

fn replay_command(args: ReplayArgs) -> ExitCode {
    let pace = match (args.speed, args.rate, args.max_rate) {
        (_, _, true) => Pace::Max,
        (_, Some(rate), _) => Pace::Rate(rate),
        (Some(speed), _, _) if speed > 0.0 && speed.is_finite() => Pace::Speed(speed),
        (Some(speed), _, _) => {
            report_error(format_args!(
                "error: --speed {speed}: give a factor above 0, such as 2 for twice as fast"
            ));
            return ExitCode::from(INVALID);
        }
        (None, None, false) => Pace::Speed(1.0),
    };
    let options = ReplayOptions {
        archives: args.archives,
        target: args.target,
        ca: args.ca,
        pace,
        max_wait: args.max_wait,
        loops: args.loops,
        concurrency: args.concurrency,
        filter_path: args.filter_path,
        filter_method: args.filter_method,
        host_header: host_policy(&args.host_header),
        protocol: upstream_protocol(&args.protocol),
        timeout: args.timeout,
        progress: !args.quiet,
        dry_run: args.dry_run,
        replay_truncated: args.replay_truncated,
    };
    let report = match runtime().and_then(|rt| rt.block_on(replay::run(options))) {
        Ok(r) => r,
        Err(e) => return command_failure(&e),
    };
    if args.report == "json" {
        out(report.to_json());
    } else {
        out(&report);
    }
    if let Some(held) = report.wrong_protocol() {
        report_error(format_args!(
            "error: the archives hold no request for this target, which speaks {}; they hold {held}: give a --target of their protocol",
            report.protocol
        ));
        return ExitCode::from(FAILED);
    }
    if report.unreachable() > 0 {
        report_error(format_args!(
            "error: the target was unreachable for {} request(s)",
            report.unreachable()
        ));
        return ExitCode::from(FAILED);
    }
    ExitCode::SUCCESS
}

/// `--host-header` of `replay` and `diff`.
fn host_policy(flag: &str) -> teeway_gateway::config::HostPolicy {
    if flag == "target" {
        teeway_gateway::config::HostPolicy::Target
    } else {
        teeway_gateway::config::HostPolicy::Keep
    }
}

/// `--protocol` of `replay` and `diff`.
fn upstream_protocol(flag: &str) -> teeway_runtime::config::UpstreamProtocol {
    match flag {
        "http2" => teeway_runtime::config::UpstreamProtocol::Http2,
        "auto" => teeway_runtime::config::UpstreamProtocol::Auto,
        _ => teeway_runtime::config::UpstreamProtocol::Http1,
    }
}

fn diff_command(args: DiffArgs) -> ExitCode {
    use teeway_runtime::yaml::{Mapping, Value};
    let list =
        |items: &[String]| Value::Sequence(items.iter().map(|i| Value::from(i.as_str())).collect());
    let mut settings = Mapping::new();
    if !args.headers.is_empty() {
        settings.insert("headers".into(), list(&args.headers));
    }
    let mut ignore = Mapping::new();
    if !args.ignore_fields.is_empty() {
        ignore.insert("fields".into(), list(&args.ignore_fields));
    }
    if !args.ignore_values.is_empty() {
        ignore.insert("values".into(), list(&args.ignore_values));
    }
    if !ignore.is_empty() {
        settings.insert("ignore".into(), Value::Mapping(ignore));
    }
    if !args.unordered.is_empty() {
        settings.insert("unordered".into(), list(&args.unordered));
    }
    if !args.endpoints.is_empty() {
        settings.insert("endpoints".into(), list(&args.endpoints));
    }
    settings.insert("max_body".into(), Value::from(args.max_body.as_str()));
    settings.insert("samples".into(), Value::from(args.samples));
    let options = teeway::diff::DiffOptions {
        archives: args.archives,
        candidate: args.candidate,
        primary: args.primary,
        secondary: args.secondary,
        settings,
        from_archive: args.from_archive,
        http: teeway::replay::HttpTargetOptions {
            ca: args.ca,
            timeout: args.timeout,
            concurrency: args.concurrency,
            protocol: upstream_protocol(&args.protocol),
            host_header: host_policy(&args.host_header),
        },
        progress: !args.quiet,
    };
    let findings = match runtime().and_then(|rt| rt.block_on(teeway::diff::run(options))) {
        Ok(f) => f,
        Err(e) => return command_failure(&e),
    };
    if args.json {
        out(&findings.summary);
    } else {
        out(&findings);
    }
    if let Some(path) = &args.report {
        if let Err(e) = std::fs::write(path, findings.report_page()) {
            report_error(format_args!("error: cannot write {}: {e}", path.display()));
            return ExitCode::from(FAILED);
        }
        if !args.json {
            out(format_args!("report:    {}", path.display()));
        }
    }
    if findings.requests == 0 {
        report_error(format_args!(
            "error: the archives hold no HTTP request to compare ({} other records)",
            findings.other_records
        ));
        return ExitCode::from(FAILED);
    }
    if !findings.absent.is_empty() {
        for absent in &findings.absent {
            report_error(format_args!("error: {absent}"));
        }
        return ExitCode::from(FAILED);
    }
    if findings.unreachable() > 0 {
        report_error(format_args!(
            "error: a target was unreachable for {} replay(s)",
            findings.unreachable()
        ));
        return ExitCode::from(FAILED);
    }
    if findings.compared() == 0 {
        report_error(format_args!(
            "error: no copy was compared ({} requests read): see the skipped reasons above",
            findings.requests
        ));
        return ExitCode::from(FAILED);
    }
    let regressions = findings.regressions();
    if args.fail_on_differing && !regressions.is_empty() {
        report_error(format_args!(
            "error: {} field(s) differ more than noise explains: {}",
            regressions.len(),
            regressions.join(", ")
        ));
        return ExitCode::from(FAILED);
    }
    ExitCode::SUCCESS
}

/// An invalid configuration: every problem, and when the file is the other half's, that first.
fn config_failure(
    e: &teeway_runtime::config::ConfigError,
    path: &Path,
    other: check::Kind,
) -> ExitCode {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    if check::detect(&text) == Some(other) {
        let (is, run) = match other {
            check::Kind::Gateway => ("a gateway", "gateway"),
            check::Kind::Agent => ("an agent", "agent"),
        };
        report_error(format_args!(
            "{}: this is {is} configuration; run `teeway {run} --config {}`",
            path.display(),
            path.display()
        ));
    } else {
        report_error(e);
    }
    ExitCode::from(INVALID)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn block_on(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(fut)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(format_args!("error: {e:#}"));
            ExitCode::from(FAILED)
        }
    }
}
