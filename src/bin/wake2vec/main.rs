//! The `wake2vec` command line: one subcommand per verb, each a thin layer over the library.
//! The flags are in `args`; each `*_verbs` module acts on the parsed flags of a group of verbs.

mod analysis_verbs;
mod args;
mod bench_verbs;
mod compare_verbs;
mod model_verbs;
mod train_verbs;
mod vocab_verbs;

use anyhow::Result;
use args::{Cli, Command, LexiconCommand};
use clap::Parser;

fn main() {
    // candle puts a captured backtrace into the text of its errors whenever RUST_BACKTRACE is
    // set, which would turn the one-line `error: ...` into dozens of lines. Library backtraces
    // stay off unless asked for by name; panics still follow RUST_BACKTRACE. Done first, before
    // any thread exists.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        // A rejected value (`--model nowhere`) is one line, like every other error; the rest
        // (help, version, usage mistakes) keep clap's own multi-line rendering.
        if e.kind() == clap::error::ErrorKind::ValueValidation {
            let rendered = e.render().to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or_default());
            std::process::exit(e.exit_code());
        }
        e.exit()
    });
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&format!("{e:#}")));
        std::process::exit(1);
    }
}

/// An error as one line: some libraries' messages span lines (TOML's, with a diagram of the
/// offending line); the diagram goes, the remaining lines are joined.
fn one_line(message: &str) -> String {
    let diagram = |l: &str| {
        let l = l
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        l.starts_with('|')
    };
    let mut out = String::new();
    let mut after_diagram = false;
    for line in message.lines() {
        if diagram(line) {
            after_diagram = true;
            continue;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push_str(if after_diagram { ": " } else { " " });
        }
        out.push_str(line);
        after_diagram = false;
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(args) => model_verbs::score(args),
        Command::Generate(args) => model_verbs::generate(args),
        Command::ImportGguf(args) => model_verbs::import_gguf(args),
        Command::Eval(args) => model_verbs::eval(args),
        Command::Inject(args) => vocab_verbs::inject(args),
        Command::ExtendTokenizer(args) => vocab_verbs::extend_tokenizer(args),
        Command::Lexicon(LexiconCommand::Mine(args)) => vocab_verbs::mine_lexicon(args),
        Command::Morphemes(cmd) => vocab_verbs::morphemes(cmd),
        Command::Train(args) => train_verbs::train(*args),
        Command::Run(args) => train_verbs::run(args),
        Command::InitStudy(args) => train_verbs::init_study(args),
        Command::Export(args) => train_verbs::export(args),
        Command::Status(args) => train_verbs::status(args),
        Command::Analyze(args) => analysis_verbs::analyze(args),
        Command::Report(args) => analysis_verbs::report(args),
        Command::ExportProjector(args) => analysis_verbs::export_projector(args),
        Command::Compare(args) => compare_verbs::compare(args),
        Command::Bench(cmd) => bench_verbs::bench(cmd),
    }
}
