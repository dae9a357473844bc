//! `warren-consumer dlq inspect|replay`: the dead-letter queue for an operator. The walk and
//! its rules are `warren::bridge::redrive`'s; this module reads the command and prints.

use std::collections::BTreeMap;

use anyhow::Context;
use warren::amqp::topology::dead_letter_queue;
use warren::bridge::redrive::{DeadLetter, Judge, Redrive, Selection};
use warren::order::CreateOrder;

use crate::settings::{ConsumerConfig, DlqCommand};

/// Runs one `dlq` command against the configured broker and queue.
pub async fn run(command: &DlqCommand, config: &ConsumerConfig) -> anyhow::Result<()> {
    if let DlqCommand::Inspect { limit, .. } = command {
        anyhow::ensure!(*limit >= 1, "--limit must be at least 1");
    }
    let amqp = &config.amqp;
    let connection = amqp
        .connect(&amqp.connection_name_or("warren-consumer-dlq"))
        .await
        .context("connecting to the broker at amqp.uri")?;
    let redrive = Redrive::open(&connection, amqp).await.with_context(|| {
        format!(
            "opening the dead-letter queue {} (does amqp.queue name the queue the consumers use?)",
            dead_letter_queue(&amqp.queue)
        )
    })?;
    match command {
        DlqCommand::Inspect { limit, json } => {
            let listing = redrive.list(*limit).await.context("listing dead letters")?;
            if *json {
                for letter in &listing.letters {
                    println!("{}", serde_json::to_string(letter)?);
                }
            } else {
                print_listing(&listing.letters, listing.unlisted, *limit);
            }
        }
        DlqCommand::Replay {
            all: _,
            reason,
            count,
            force,
        } => {
            let selection = Selection {
                reason: reason.clone(),
                count: *count,
                force: *force,
            };
            let mut judge = Judge::<CreateOrder>::new(selection, amqp, &config.bridge);
            let report = redrive
                .replay(&mut judge)
                .await
                .context("replaying dead letters")?;
            for (letter, why) in &report.refused {
                println!("kept {}: {why}", describe(letter));
            }
            println!(
                "replayed {}, kept {} refused and {} not selected",
                report.replayed,
                report.refused.len(),
                report.not_selected
            );
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

fn describe(letter: &DeadLetter) -> String {
    format!(
        "{} from {} ({} bytes, replayed {} times)",
        letter.message_id.as_deref().unwrap_or("(no message id)"),
        letter.source_queue.as_deref().unwrap_or("an unknown queue"),
        letter.body_bytes,
        letter.replays
    )
}

/// One line per dead letter, then the count per kind of reason.
fn print_listing(letters: &[DeadLetter], unlisted: u32, limit: usize) {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for (n, letter) in letters.iter().enumerate() {
        *kinds.entry(letter.reason_kind()).or_default() += 1;
        println!("{:>5}  {}", n + 1, describe(letter));
        println!("       reason: {}", letter.reason);
        println!("       body:   {}", letter.body_preview);
    }
    if !kinds.is_empty() {
        println!("by reason:");
    }
    for (kind, count) in &kinds {
        println!("{count:>7}  {kind}");
    }
    print!("{} dead letters listed", letters.len());
    if unlisted > 0 {
        print!(", {unlisted} more beyond --limit {limit}");
    }
    println!();
}
