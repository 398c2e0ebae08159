//! `ambridge-cni`: the chained CNI plugin (see `ambridge::cni::plugin`).
//! The container runtime runs it with the CNI environment and the network
//! configuration on stdin; it prints the result (or the error) on stdout.

use std::io::Read as _;

use ambridge::cni::plugin::{self, CniError, ErrorCode, Invocation};

fn main() {
    let mut stdin = Vec::new();
    let outcome = std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|e| CniError {
            code: ErrorCode::Io,
            msg: "reading the network configuration on stdin".into(),
            details: e.to_string(),
        })
        .and_then(|_| Invocation::from_env(|k| std::env::var(k).ok()))
        .and_then(|invocation| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CniError {
                    code: ErrorCode::Io,
                    msg: "starting the runtime".into(),
                    details: e.to_string(),
                })?
                .block_on(plugin::run(&invocation, &stdin))
        });
    match outcome {
        Ok(Some(result)) => println!("{result}"),
        Ok(None) => {}
        Err(e) => {
            // The error names the configuration's version where it has one.
            let version = serde_json::from_slice::<serde_json::Value>(&stdin)
                .ok()
                .and_then(|c| c["cniVersion"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "1.0.0".into());
            println!("{}", e.to_json(&version));
            eprintln!("ambridge-cni: {e}");
            std::process::exit(1);
        }
    }
}
