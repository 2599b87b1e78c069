//! The `tessera` command: `gateway`, `demo`, `config check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tessera::logging::{self, LogFormat};

/// tessera: erasure-coded, multi-active block storage over iSCSI.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the gateway daemon (iSCSI target).
    Gateway {
        /// Configuration file (TOML; see target-config/).
        #[arg(long)]
        config: PathBuf,
    },
    /// Serve a LUN locally with one command (see README).
    Demo(tessera::demo::DemoArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Check a configuration file; errors name the file, line and key.
    Check {
        /// The file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let r = match cli.cmd {
        Cmd::Gateway { config } => tessera::gateway::run_config(&config),
        Cmd::Demo(a) => tessera::demo::run(a),
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => match tessera::config::Config::load(&file) {
            Ok(c) => {
                let luns: usize = c.targets.iter().map(|t| t.luns.len()).sum();
                println!(
                    "{}: OK ({} targets, {luns} LUNs)",
                    file.display(),
                    c.targets.len()
                );
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            ExitCode::FAILURE
        }
    }
}
