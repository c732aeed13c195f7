//! `ferry explain`: fetch (`observe`), explain (`explanation`, pure), print (`render`).

pub mod explanation;
pub mod observe;
pub mod render;

use anyhow::Context;

use crate::{ExplainArgs, Output};

pub async fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let name = crate::service_name(&args.service).map_err(anyhow::Error::msg)?;
    let observed = crate::from_api(async {
        let client = ferry_runtime::kube_client().await?;
        observe::observe(&client, &args.namespace, name, &args.forwarder_namespace).await
    })
    .await?;
    let explanation = explanation::explain(&observed);
    let text = match args.output {
        Output::Json => {
            serde_json::to_string_pretty(&explanation).context("encoding the explanation")?
        }
        Output::Text => render::render(&explanation),
    };
    println!("{text}");
    Ok(())
}
