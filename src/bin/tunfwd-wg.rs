//! `tunfwd-wg IFACE`: tunfwd with wireguard-go's contract, for wg-quick
//! (`WG_QUICK_USERSPACE_IMPLEMENTATION=tunfwd-wg`); see `tunfwd::wg_quick`.

fn main() -> std::process::ExitCode {
    tunfwd::wg_quick::main()
}
