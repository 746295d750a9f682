//! `mapkv crashtest`: placeholder until the crash-torture work lands.

use std::path::PathBuf;

/// Arguments of `mapkv crashtest`.
#[derive(Debug, clap::Args)]
pub struct CrashtestArgs {
    /// Kill -9 rounds per durability policy.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Stop after about this many seconds.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Directory for the temporary stores (default: a fresh temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Runs the torture test; `Ok(true)` if no violation was found.
pub fn run(_args: &CrashtestArgs) -> Result<bool, String> {
    Err("crashtest is not implemented yet".into())
}
