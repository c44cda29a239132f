//! The `teeway` command line: a thin layer over the agent, gateway and command libraries.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use teeway::{certs, check, demo};

/// Cross-cluster traffic mirroring: tee production requests over mTLS QUIC to shadow services.
#[derive(Debug, Parser)]
#[command(name = "teeway", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
enum CertsCommand {
    /// Write a CA, a gateway certificate and an agent certificate into a folder.
    Init {
        /// Folder to write into.
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name or IP for the gateway certificate (repeatable); localhost and
        /// 127.0.0.1 are always covered.
        #[arg(long = "gateway-name")]
        gateway_names: Vec<String>,
        /// The agent's identity, carried in its certificate.
        #[arg(long, default_value = "agent")]
        agent_name: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    teeway_wire::tls::install_default_provider();
    match cli.command {
        Command::Check { files } => {
            init_logging("warn");
            let mut failed = false;
            for file in files {
                match check::check_file(&file) {
                    Ok(summary) => println!("{}: ok ({summary})", file.display()),
                    Err(e) => {
                        failed = true;
                        println!("{e}");
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    gateway_names,
                    agent_name,
                    force,
                },
        } => {
            init_logging("warn");
            match certs::init(&certs::InitOptions {
                dir,
                gateway_names,
                agent_name,
                force,
            }) {
                Ok(paths) => {
                    for p in paths {
                        println!("wrote {}", p.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Agent { config } => {
            init_logging("info");
            // Validate everything before any port is bound.
            let config = match teeway_agent::AgentConfig::from_file(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            block_on(async move {
                let listeners = teeway_agent::AgentListeners::bind(&config).await?;
                let shutdown = CancellationToken::new();
                teeway_runtime::shutdown::cancel_on_signal(shutdown.clone())?;
                teeway_agent::run(config, listeners, shutdown).await?;
                Ok(())
            })
        }
        Command::Gateway { config } => {
            init_logging("info");
            let config = match teeway_gateway::GatewayConfig::from_file(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            block_on(async move {
                let listeners = teeway_gateway::GatewayListeners::bind(&config).await?;
                let shutdown = CancellationToken::new();
                teeway_runtime::shutdown::cancel_on_signal(shutdown.clone())?;
                teeway_gateway::run(config, listeners, shutdown).await?;
                Ok(())
            })
        }
        Command::Demo { requests, serve } => {
            init_logging("warn");
            match runtime()
                .and_then(|rt| rt.block_on(demo::run(demo::DemoOptions { requests, serve })))
            {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_failure(e: &teeway_runtime::config::ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(2)
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
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
