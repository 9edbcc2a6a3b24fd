//! The README's and the user guide's commands against the CLI: every `sh` block of `README.md`
//! and `docs/src/*.md` is read as a shell user would type it, and each `mpcformer` command in it
//! (or `cargo run --release -- ...`) must name subcommands that exist and only `--flags` that
//! the subcommand's `--help` declares. Paths into the repository must exist, and the guide's
//! recipe examples must load as recipes. A command that drifts from the CLI fails here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use mpcformer::train::recipe::Recipe;

/// The checkout's root, read at run time: a target dir shared between clones may hold a test
/// binary built in another checkout.
fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into())
}

/// README.md and every page of the guide.
fn pages() -> Vec<PathBuf> {
    let root = root();
    let mut pages = vec![root.join("README.md")];
    let guide = root.join("docs/src");
    let mut md: Vec<PathBuf> = std::fs::read_dir(&guide)
        .unwrap_or_else(|e| panic!("{}: {e}", guide.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    md.sort();
    pages.extend(md);
    pages
}

/// The fenced blocks of `lang` in a Markdown text: (line of the opening fence, body).
fn blocks(md: &str, lang: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in md.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (None, Some(info)) if info.trim() == lang => open = Some((i + 1, String::new())),
            (Some(_), Some(_)) => out.push(open.take().unwrap()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(open.is_none(), "an unclosed ```{lang} block");
    out
}

/// A shell line split into words as the shell would (quotes removed, no expansion), up to a
/// comment; `&&`, `;` and `|` end a command.
fn commands_of_line(line: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_default().push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_default();
            }
            (None, '#') if word.is_none() => break,
            (None, ' ' | '\t') => commands.last_mut().unwrap().extend(word.take()),
            (None, ';' | '|' | '&') => {
                commands.last_mut().unwrap().extend(word.take());
                if chars.peek() == Some(&c) {
                    chars.next();
                }
                commands.push(Vec::new());
            }
            (None, c) => word.get_or_insert_default().push(c),
        }
    }
    assert!(quote.is_none(), "unbalanced quotes in {line:?}");
    commands.last_mut().unwrap().extend(word);
    commands.retain(|c| !c.is_empty());
    commands
}

/// Every command of an `sh` block, with the line it starts on; `\` continues a line.
fn commands(start: usize, body: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut joined = String::new();
    let mut first = 0;
    for (i, line) in body.lines().enumerate() {
        if joined.is_empty() {
            first = start + 1 + i;
        }
        match line.strip_suffix('\\') {
            Some(head) => joined.push_str(head),
            None => {
                joined.push_str(line);
                out.extend(commands_of_line(&joined).into_iter().map(|c| (first, c)));
                joined.clear();
            }
        }
    }
    assert!(joined.is_empty(), "a block ends in a `\\` continuation");
    out
}

/// The arguments `mpcformer` gets from a command: after `mpcformer`, or after
/// `cargo run --release --`. `None` for other programs.
fn mpcformer_args(words: &[String]) -> Option<&[String]> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["mpcformer", ..] => Some(&words[1..]),
        ["cargo", "run", ..] => {
            let dashdash = w.iter().position(|x| *x == "--")?;
            Some(&words[dashdash + 1..])
        }
        _ => None,
    }
}

/// `mpcformer <path...> --help`, cached.
struct Cli {
    helps: HashMap<Vec<String>, String>,
}

impl Cli {
    fn new() -> Self {
        Self {
            helps: HashMap::new(),
        }
    }

    fn help(&mut self, path: &[String]) -> &str {
        self.helps.entry(path.to_vec()).or_insert_with(|| {
            let out = Command::new(env!("CARGO_BIN_EXE_mpcformer"))
                .args(path)
                .arg("--help")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "mpcformer {} --help failed: {}",
                path.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        })
    }
}

/// The subcommands a help text lists under `Commands:`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l[2..].starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// The long options a help text declares: its option lines up to the description column (not
/// its examples, nor options its descriptions mention).
fn options(help: &str) -> Vec<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .map(|l| l.split("  ").next().unwrap())
        .flat_map(|l| l.split([' ', ',']))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split(['=', '[', '<']).next().unwrap().to_string())
        .collect()
}

/// What is wrong with `mpcformer <args>`: an unknown or missing subcommand, or options its
/// subcommand does not declare.
fn check(cli: &mut Cli, args: &[String]) -> Vec<String> {
    let mut path: Vec<String> = Vec::new();
    let mut rest = args;
    loop {
        let subs = subcommands(cli.help(&path));
        if subs.is_empty() {
            break;
        }
        match rest.first() {
            Some(w) if subs.contains(w) => {
                path.push(w.clone());
                rest = &rest[1..];
            }
            Some(w) if w == "--help" || w == "--version" => return vec![],
            other => {
                return vec![format!(
                    "`mpcformer {}` needs a subcommand ({}), got {:?}",
                    path.join(" "),
                    subs.join(", "),
                    other.map(String::as_str).unwrap_or("nothing")
                )];
            }
        }
    }
    let declared = options(cli.help(&path));
    rest.iter()
        .take_while(|w| *w != "--")
        .filter(|w| w.starts_with("--"))
        .map(|w| w.split('=').next().unwrap())
        .filter(|f| !declared.iter().any(|d| d == f))
        .map(|f| {
            format!(
                "`mpcformer {}` has no option {f} (its --help declares {})",
                path.join(" "),
                declared.join(" ")
            )
        })
        .collect()
}

/// Words (and `key=value` values) that name a file of the repository must name one that exists.
fn missing_paths(words: &[String]) -> Vec<String> {
    const TRACKED: [&str; 5] = ["recipes/", "scripts/", "data/", "tests/fixtures/", "bench/"];
    words
        .iter()
        .flat_map(|w| w.split('='))
        .filter(|w| TRACKED.iter().any(|t| w.starts_with(t)))
        .filter(|w| !w.contains(['{', '*', '$', '<']))
        .filter(|w| !root().join(w).exists())
        .map(|w| format!("{w} does not exist in the repository"))
        .collect()
}

/// Programs a guide command may run besides `mpcformer`.
fn known_program(words: &[String]) -> Result<(), String> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["cargo", sub, ..] => {
            let ok = ["build", "check", "clippy", "fmt", "install", "run", "test"];
            if ok.contains(sub) {
                Ok(())
            } else {
                Err(format!("cargo {sub} is not a command this guide uses"))
            }
        }
        ["mpcformer", ..] => Ok(()),
        [script, ..] if script.starts_with("scripts/") || script.starts_with("bench/") => {
            if root().join(script).is_file() {
                Ok(())
            } else {
                Err(format!("{script} does not exist"))
            }
        }
        [program, ..] => Err(format!("{program}: not a program this guide may run")),
        [] => Ok(()),
    }
}

/// Every problem of every `sh` block of one Markdown text, each naming the page and line.
fn problems_of(page: &str, md: &str, cli: &mut Cli) -> Vec<String> {
    let mut problems = Vec::new();
    for (start, body) in blocks(md, "sh") {
        for (line, words) in commands(start, &body) {
            let mut found = missing_paths(&words);
            found.extend(known_program(&words).err());
            if let Some(args) = mpcformer_args(&words) {
                found.extend(check(cli, args));
            }
            problems.extend(found.into_iter().map(|p| format!("{page}:{line}: {p}")));
        }
    }
    problems
}

#[test]
fn guide_commands_exist_in_the_cli() {
    let mut cli = Cli::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let md = std::fs::read_to_string(&page).unwrap();
        let name = page.strip_prefix(root()).unwrap().display().to_string();
        for (start, body) in blocks(&md, "sh") {
            checked += commands(start, &body)
                .iter()
                .filter(|(_, w)| mpcformer_args(w).is_some())
                .count();
        }
        problems.extend(problems_of(&name, &md, &mut cli));
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    // The guide is mostly commands: a parser that stopped finding them would pass vacuously.
    assert!(checked >= 50, "only {checked} mpcformer commands found");
}

/// The checker itself: it must catch what it is there to catch.
#[test]
fn drifted_commands_are_caught() {
    let mut cli = Cli::new();
    let page = "```sh\n\
        mpcformer eval --model m --task sst2 --bogus-flag 3   # a flag that does not exist\n\
        mpcformer evaluate --model m\n\
        mpcformer mpc serve-forever --model m\n\
        mpcformer mpc\n\
        mpcformer run recipes/no-such-recipe.toml\n\
        cargo run --release -- export --run r --out o --no-such-option\n\
        rm -rf checkpoints\n\
        mpcformer eval --model m --task sst2 && mpcformer load-check e --verbose\n\
        ```\n\
        ```sh\n\
        mpcformer mpc party --party 0 --certs c --model e \\\n    --listen a:1 --dealer d:2 --frobnicate\n\
        ```\n";
    let problems = problems_of("test.md", page, &mut cli);
    let expect = [
        ("test.md:2:", "no option --bogus-flag"),
        ("test.md:3:", "needs a subcommand"),
        ("test.md:4:", "needs a subcommand"),
        ("test.md:5:", "got \"nothing\""),
        ("test.md:6:", "recipes/no-such-recipe.toml does not exist"),
        ("test.md:7:", "no option --no-such-option"),
        ("test.md:8:", "rm: not a program"),
        (
            "test.md:9:",
            "`mpcformer load-check` has no option --verbose",
        ),
        ("test.md:12:", "no option --frobnicate"),
    ];
    for (at, what) in expect {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(at) && p.contains(what)),
            "expected {at} {what} in:\n{}",
            problems.join("\n")
        );
    }
    assert_eq!(problems.len(), expect.len(), "{}", problems.join("\n"));
    // The same commands, corrected, pass.
    let fixed = "```sh\n\
        mpcformer eval --model m --task sst2 --batch-size 3   # a comment --bogus-flag\n\
        mpcformer mpc party --party 0 --certs c --model e --listen a:1 --dealer d:2\n\
        mpcformer run recipes/quickstart.toml --set 'name=x y'\n\
        ```\n";
    assert_eq!(
        problems_of("fixed.md", fixed, &mut cli),
        Vec::<String>::new()
    );
}

/// The guide's recipe examples load as recipes, with `extends` read from `recipes/` as if the
/// example were a file there (unknown keys are errors, so a misspelt key fails).
#[test]
fn guide_recipe_examples_load() {
    let page = root().join("docs/src/recipes.md");
    let md = std::fs::read_to_string(&page).unwrap();
    let examples = blocks(&md, "toml");
    assert!(
        !examples.is_empty(),
        "no ```toml example in {}",
        page.display()
    );
    let dir = tempfile::tempdir().unwrap();
    for (line, body) in examples {
        let file = dir.path().join(format!("example-{line}.toml"));
        std::fs::write(&file, &body).unwrap();
        let value: toml::Value = toml::from_str(&body).unwrap();
        let sets: Vec<String> = match value.get("extends").and_then(|e| e.as_str()) {
            Some(base) => vec![format!(
                "extends={}",
                root().join("recipes").join(base).display()
            )],
            None => vec![],
        };
        Recipe::load(&file, &sets).unwrap_or_else(|e| panic!("{}:{line}: {e:#}", page.display()));
    }
}

#[test]
fn readme_points_into_the_guide() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let summary = std::fs::read_to_string(root().join("docs/src/SUMMARY.md")).unwrap();
    let summary_pages: Vec<&str> = summary
        .split("](")
        .skip(1)
        .filter_map(|s| s.split(')').next())
        .collect();
    assert!(summary_pages.len() >= 10, "{summary_pages:?}");
    for p in summary_pages {
        assert!(
            root().join("docs/src").join(p).is_file(),
            "SUMMARY.md lists {p}, which does not exist"
        );
        if p != "introduction.md" {
            assert!(
                readme.contains(&format!("docs/src/{p}")),
                "README does not link {p}"
            );
        }
    }
    // CI runs the README's test command; it must stay `cargo test`.
    let test = &readme[readme.find("## Test").expect("README has a Test section")..];
    assert!(
        test.contains("```sh\ncargo test\n```"),
        "README's Test section changed"
    );
}
