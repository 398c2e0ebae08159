//! Builds the kernel programs (`ebpf/ambridge-ebpf`) for the BPF target with
//! the nightly toolchain and bpf-linker (the object is embedded in the
//! daemon), and the protocols in `proto/` (with protoc): the local API it
//! serves, istiod's delta ADS it calls, and ZDS it serves to ztunnel.

fn main() -> anyhow::Result<()> {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["../proto/ambridge/v1/node.proto"], &["../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_protos(
            &[
                "../proto/envoy/service/discovery/v3/ads.proto",
                "../proto/istio/workload/workload.proto",
                "../proto/istio/workload/zds.proto",
            ],
            &["../proto"],
        )?;
    // aya-build watches the program crate; the shared types live apart.
    println!("cargo:rerun-if-changed=../ebpf/ambridge-common/src");
    println!("cargo:rerun-if-changed=../proto");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ambridge-ebpf",
            root_dir: "../ebpf/ambridge-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
