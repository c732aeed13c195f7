//! `ferry migrate`: read MetalLB's resources (`source`), map them (`mapping`, pure), write
//! the pools as YAML on stdout and the report on stderr.

pub mod mapping;
pub mod source;

use anyhow::Context;

use crate::MigrateArgs;

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let docs = if args.from_cluster {
        crate::from_api(source::from_cluster(&args.metallb_namespace)).await?
    } else {
        source::from_files(&args.files)?
    };
    let migration = mapping::migrate(&docs);
    let yaml = mapping::pools_yaml(&migration.pools).context("encoding the pools")?;
    print!("{yaml}");
    for line in &migration.report {
        eprintln!("{line}");
    }
    Ok(())
}
