//! The fake istiod's side of delta ADS and the workload resource, from the
//! same `proto/` files the daemon is built from.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(
            &[
                "../proto/envoy/service/discovery/v3/ads.proto",
                "../proto/istio/workload/workload.proto",
            ],
            &["../proto"],
        )?;
    Ok(())
}
