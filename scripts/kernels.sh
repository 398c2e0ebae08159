#!/usr/bin/env bash
# The kernel matrix: boots each of Debian's kernels in a qemu VM (KVM when
# /dev/kvm works, software emulation otherwise) and runs the real-kernel
# conformance tests inside it, then prints a table: kernel x test ->
# pass / fail. Run as root, after `cargo build --bins` and with the test
# binaries built (`cargo test --no-run`); scripts/setup.sh installs what
# it needs.
#
# The VM's root filesystem is this machine's own, shared read-only over
# virtio-9p: the same binaries, tools and checkout run inside, on the
# guest's kernel. Its /tmp, /run and the results directory are its own.
# Each kernel comes from Debian's archive, checked against the archive's
# signed Release file, unpacked once into the cache with an initramfs of
# busybox and the modules that mount the shared root.
#
#   scripts/kernels.sh [--quick] [--kernels "bullseye bookworm trixie"]
#                      [--suites "redirect ..."] [--out DIR] [--filter TEXT]
#                      [--prepare]
#
# --suites runs those conformance suites (tests/<name>.rs) instead.
# --prepare only fetches the kernels and builds their images (cached).
# --quick runs the outbound subset (redirect + SO_ORIGINAL_DST +
# getpeername + bind-undo: tests/redirect.rs) on each kernel; without it,
# the redirect, ztunnel-semantics, inbound and DNS suites. Results go to
# DIR (default target/kernels): one log per kernel and suite, and
# results.md with the table.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f $HOME/.cargo/env ]] && source "$HOME/.cargo/env"

CACHE=${AMBRIDGE_KERNELS_CACHE:-/var/cache/ambridge-kernels}
MIRROR=${AMBRIDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
KERNELS="bullseye bookworm trixie"
OUT=target/kernels
QUICK=0
PREPARE=0
ONLY_SUITES=""
FILTER=""
# Minutes one suite may take in a VM before it counts as failed.
SUITE_MINUTES=${AMBRIDGE_KERNELS_SUITE_MINUTES:-25}

while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        --kernels) KERNELS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --filter) FILTER=$2; shift ;;
        --prepare) PREPARE=1 ;;
        --suites) ONLY_SUITES=$2; shift ;;
        *) echo "kernels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '\033[1m[kernels]\033[0m %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# fetch URL FILE: downloads URL to FILE (via a partial file, so an
# interrupted download is never taken for a whole one).
fetch() {
    curl -fsSL --retry 3 -o "$2.part" "$1" && mv "$2.part" "$2"
}

# sha256_in INDEX PATH: the SHA256 that a Release file gives for PATH.
sha256_in() {
    awk -v path="$2" '
        /^SHA256:/ { in_sha = 1; next }
        /^[^ ]/ { in_sha = 0 }
        in_sha && $3 == path { print $1; exit }' "$1"
}

# verify FILE SHA256: fails unless FILE has that digest.
verify() {
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    [[ $got == "$2" ]] || die "$1: SHA256 $got, the archive says $2"
}

# kernel_dir SUITE: unpacks the kernel that SUITE's linux-image-amd64
# depends on into the cache (once) and prints its directory, which holds
# boot/vmlinuz-VERSION, lib/modules/VERSION (with depmod's index) and
# initramfs.cpio.gz.
kernel_dir() {
    local suite=$1 dir="$CACHE/$1"
    if [[ -f $dir/ready ]]; then
        echo "$dir"
        return
    fi
    mkdir -p "$dir"
    say "$suite: fetching the signed Release file and the package index"
    # A suite past its life moves from the mirrors to archive.debian.org.
    local mirror=$MIRROR
    if ! fetch "$mirror/dists/$suite/InRelease" "$dir/InRelease"; then
        mirror=http://archive.debian.org/debian
        fetch "$mirror/dists/$suite/InRelease" "$dir/InRelease" ||
            die "$suite: no InRelease on $MIRROR nor on $mirror"
    fi
    gpgv --keyring "$KEYRING" --output "$dir/Release" "$dir/InRelease" 2> "$dir/gpgv.log" ||
        die "$suite: InRelease does not verify against $KEYRING: $(cat "$dir/gpgv.log")"
    # Signed, and for the suite asked for (not another suite's signed file).
    grep -qx "Codename: $suite" "$dir/Release" ||
        die "$suite: the signed Release file is for $(grep -m1 '^Codename:' "$dir/Release")"
    fetch "$mirror/dists/$suite/main/binary-amd64/Packages.xz" "$dir/Packages.xz"
    verify "$dir/Packages.xz" "$(sha256_in "$dir/Release" main/binary-amd64/Packages.xz)"
    xz -dc "$dir/Packages.xz" > "$dir/Packages"
    # linux-image-amd64 depends on the current kernel, linux-image-<abi>-amd64.
    local image
    image=$(awk '/^Package: / { p = $2 } p == "linux-image-amd64" && /^Depends: / {
        sub(/^Depends: /, ""); split($0, d, /[ ,(]/); print d[1]; exit }' "$dir/Packages")
    [[ -n $image ]] || die "$suite: no linux-image-amd64 in the index"
    local filename sha
    read -r filename sha < <(awk -v pkg="$image" '
        /^Package: / { p = $2 } p == pkg && /^Filename: / { f = $2 }
        p == pkg && /^SHA256: / { s = $2 } p == pkg && /^$/ && f { print f, s; exit }' "$dir/Packages") || true
    [[ -n $filename ]] || die "$suite: no $image in the index"
    say "$suite: fetching $image ($filename)"
    fetch "$mirror/$filename" "$dir/image.deb"
    verify "$dir/image.deb" "$sha"
    rm -rf "$dir/root"
    dpkg-deb -x "$dir/image.deb" "$dir/root"
    # Debian 13 ships its modules under /usr (merged /usr), where
    # modprobe -d does not look.
    if [[ -d $dir/root/usr/lib/modules && ! -e $dir/root/lib ]]; then
        ln -s usr/lib "$dir/root/lib"
    fi
    local version
    version=$(basename "$(ls -d "$dir"/root/lib/modules/*)")
    depmod -b "$dir/root" "$version"
    build_initramfs "$dir/root" "$version" "$dir/initramfs.cpio.gz"
    echo "$version" > "$dir/version"
    rm -f "$dir/image.deb" "$dir/Packages" "$dir/Packages.xz"
    touch "$dir/ready"
    echo "$dir"
}

# build_initramfs ROOT VERSION OUT: busybox, the modules that mount a
# virtio-9p root (with their dependencies, in load order) and an init
# that mounts this machine's root read-only and runs the guest script
# there.
build_initramfs() {
    local root=$1 version=$2 out=$3 staging
    staging=$(mktemp -d)
    mkdir -p "$staging"/{bin,dev,proc,sys,newroot,modules}
    cp /bin/busybox "$staging/bin/busybox"
    : > "$staging/modules/order"
    local line module
    while read -r line; do
        # `insmod /path/module.ko[.xz|.zst] ` lines; builtin ones are skipped.
        [[ $line == insmod* ]] || continue
        module=$(echo "$line" | awk '{ print $2 }')
        case $module in
            *.ko.xz) xz -dc "$module" > "$staging/modules/$(basename "${module%.xz}")" ;;
            *.ko.zst) zstd -qdc "$module" > "$staging/modules/$(basename "${module%.zst}")" ;;
            *) cp "$module" "$staging/modules/" ;;
        esac
        module=$(basename "$module")
        module=${module%.xz}
        module=${module%.zst}
        grep -qx "$module" "$staging/modules/order" || echo "$module" >> "$staging/modules/order"
    done < <(modprobe -d "$root" -S "$version" --show-depends \
        -a virtio_pci virtio_blk 9pnet_virtio 9p 2> /dev/null || true)
    modprobe -d "$root" -S "$version" --show-depends 9p > /dev/null 2>&1 ||
        die "$version: no 9p file system (module or built in) to mount the shared root"
    cp scripts/kernels-init.sh "$staging/init"
    chmod +x "$staging/init"
    (cd "$staging" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
    rm -rf "$staging"
}

# test_binary SUITE: the path of conformance/tests/SUITE.rs's test binary
# (built by `cargo test --no-run`, which this runs: nothing is rebuilt
# when it is up to date).
test_binary() {
    cargo test --no-run -q -p ambridge-conformance --test "$1" --message-format=json 2> /dev/null |
        grep -F '"kind":["test"]' | grep -F "\"name\":\"$1\"" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1 || true
}

# accel: qemu's accelerator arguments. KVM where this machine's CPU offers
# virtualisation (a /dev/kvm without it, as in a VM without nested
# virtualisation, opens and then never runs a guest); software emulation
# otherwise.
kvm() {
    [[ -w /dev/kvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo
}
accel() {
    if kvm; then
        echo "-accel kvm -cpu host"
    else
        echo "-accel tcg"
    fi
}

# How many times longer the tests wait in the guest: software emulation
# runs them about ten times slower than this machine.
TIME_SCALE=${AMBRIDGE_KERNELS_TIME_SCALE:-$(kvm && echo 2 || echo 10)}

# boot SUITE RESULTS: boots SUITE's kernel with this machine's root shared
# read-only and RESULTS writable, and waits for the guest to run the plan
# in RESULTS/plan and power off.
boot() {
    local suite=$1 results=$2 dir version minutes
    dir=$(kernel_dir "$suite")
    version=$(cat "$dir/version")
    minutes=$((SUITE_MINUTES * $(wc -l < "$results/plan") + 5))
    say "$suite: booting $version (at most $minutes minutes)"
    # The results share is mapped: what the guest's root creates there
    # (modes, owners, device nodes) stays metadata, not host files.
    timeout --kill-after=30 "${minutes}m" qemu-system-x86_64 \
        $(accel) -smp 2 -m 3G \
        -nographic -no-reboot -nic none \
        -kernel "$dir/root/boot/vmlinuz-$version" -initrd "$dir/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 AMBRIDGE_GUEST=$PWD/scripts/kernels-guest.sh AMBRIDGE_CHECKOUT=$PWD AMBRIDGE_KERNEL_ROOT=$dir/root AMBRIDGE_TEST_TIME_SCALE=$TIME_SCALE" \
        -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
        -virtfs "local,path=$results,mount_tag=results,security_model=mapped-xattr,multidevs=remap" \
        > "$results/console.log" 2>&1 || true
    [[ -f $results/done ]] || say "$suite: the guest did not finish: see $results/console.log"
}

# The suites each kernel runs, and which of their tests (none: all).
declare -A TESTS
if ((QUICK)); then
    SUITES="redirect ztunnel"
    TESTS[redirect]="enrolled_pod_ipv4_connect_lands_on_its_own_15001_with_the_original_destination
        enrolled_pod_ipv6_connect_lands_on_its_own_15001_with_the_original_destination
        the_server_sees_the_relayed_connection_from_the_client_pod_ip"
    TESTS[ztunnel]="undo_rewrites_ztunnels_original_source_bind_and_the_app_still_sees_the_client_ip"
else
    SUITES="redirect ztunnel inbound dns"
fi
SUITES=${ONLY_SUITES:-$SUITES}

if ((PREPARE)); then
    for suite in $KERNELS; do
        dir=$(kernel_dir "$suite")
        say "$suite: $(cat "$dir/version"), in $dir"
    done
    exit 0
fi

mkdir -p "$OUT"
OUT=$(realpath "$OUT")
cargo build --bins -q
table="$OUT/results.md"
{
    echo "| kernel | programs the verifier refuses | daemon | $(echo $SUITES | sed 's/ / | /g') |"
    echo "|---|---|---|$(for _ in $SUITES; do printf -- '---|'; done)"
} > "$table.part"
failed_any=0
for suite in $KERNELS; do
    results="$OUT/$suite"
    rm -rf "$results"
    mkdir -p "$results"
    for tests in $SUITES; do
        binary=$(test_binary "$tests")
        [[ -x $binary ]] || die "no test binary for conformance/tests/$tests.rs"
        if [[ -n $FILTER ]]; then
            args=$FILTER
        elif [[ -n ${TESTS[$tests]:-} ]]; then
            args="--exact $(echo ${TESTS[$tests]})"
        else
            args=""
        fi
        echo "$tests $binary $args" >> "$results/plan"
    done
    boot "$suite" "$results"
    version=$(cat "$CACHE/$suite/version")
    # `ambridge version`'s program table: the names not "loaded".
    if grep -q '^PROGRAM' "$results/version.txt" 2> /dev/null; then
        refused=$(awk '$1 == "PROGRAM" { table = 1; next } table && $2 != "loaded" { print "`" $1 "`" }' \
            "$results/version.txt" | paste -sd' ' -)
    else
        refused="(not checked: see version.txt)"
    fi
    start=$(head -1 "$results/start.txt" 2> /dev/null || true)
    # The program the daemon's one line names, where a verifier refused it.
    program=$(echo "$start" | sed -n 's/.*the verifier of Linux [^ ]* refused program \(`[^`]*`\).*/\1/p')
    case $start in
        started) daemon=starts ;;
        stopped*)
            # A refusal counts only as the verifier's, of a program that
            # `ambridge version` also found refused, with nothing left
            # attached; any other stop is a failure.
            if [[ -n $program && " ${refused:-} " == *" $program "* ]] &&
                grep -q '^links pinned after it stopped: 0$' "$results/start.txt"; then
                daemon="refuses: $program$(echo "$start" | sed -n 's/.*refused program `[^`]*`\( ([^)]*)\)\{0,1\}.*/\1/p')"
            else
                daemon="FAILS TO START: ${start#stopped }"
                failed_any=1
            fi
            ;;
        *)
            daemon="FAILS TO START: ${start:-no start check}"
            failed_any=1
            ;;
    esac
    row="| $version ($suite) | ${refused:-none} | $daemon |"
    for tests in $SUITES; do
        log="$results/$tests.log"
        passed=$(grep -c '^test .* \.\.\. ok$' "$log" 2> /dev/null || true)
        failed=$(grep -c '^test .* \.\.\. FAILED$' "$log" 2> /dev/null || true)
        rc=$(cat "$results/$tests.rc" 2> /dev/null || echo none)
        # Each test asked for by name ran (a renamed one would not).
        wanted=$(echo ${TESTS[$tests]:-} | wc -w)
        if [[ $rc == 0 ]] && ((passed > 0)) && { [[ -n $FILTER ]] || ((wanted == 0 || passed == wanted)); }; then
            cell="pass ($passed)"
        elif [[ $rc == 0 ]]; then
            cell="FAIL (ran $passed, asked for ${wanted})"
            failed_any=1
        elif [[ $rc == none && $daemon == refuses* ]]; then
            cell="refused at start"
        elif [[ $rc == none ]]; then
            cell="did not run"
            failed_any=1
        else
            cell="FAIL ($failed of $((passed + failed)))"
            failed_any=1
        fi
        row="$row $cell |"
    done
    echo "$row" >> "$table.part"
done
mv "$table.part" "$table"
cat "$table"
# The committed results are README's table too.
if [[ $OUT == "$(realpath docs/kernels)" ]]; then
    awk -v table="$table" '
        /<!-- kernel-matrix:begin -->/ { print; while ((getline line < table) > 0) print line; skip = 1; next }
        /<!-- kernel-matrix:end -->/ { skip = 0 }
        !skip' README.md > README.md.part && mv README.md.part README.md
    say "README.md's kernel table updated"
fi
exit "$failed_any"
