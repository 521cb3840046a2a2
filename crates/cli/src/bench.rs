pub fn main(
    _g: &crate::setup::GlobalArgs,
    _a: BenchArgs,
) -> anyhow::Result<std::process::ExitCode> {
    todo!()
}
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}
