//! Argv templates: the `{placeholder}` syntax of the catalogue's `script_args`,
//! `handler.args` and `compile.args`, checked when a catalogue is loaded and
//! expanded when a task is planned.
//!
//! A placeholder may sit inside a larger argument (`-XX:MaxRAM={memory_bytes}`),
//! except `{sources}`, which expands to several arguments and so must be a whole
//! argument. `{{` and `}}` stand for a literal brace.

use std::fmt;

/// A value that an argv template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placeholder {
    /// `{interpreter}`: the resolved interpreter (canonical host path).
    Interpreter,
    /// `{compiler}`: the resolved compiler (canonical host path).
    Compiler,
    /// `{entry}`: absolute sandbox path of the entry file, e.g. `/task/main.py`.
    Entry,
    /// `{wrapper}`: absolute sandbox path of the handler wrapper, e.g.
    /// `/opt/taskexec/python_handler.py`.
    Wrapper,
    /// `{work}`: the work directory, `/task`.
    Work,
    /// `{main_class}`: the Java main class derived from the entry file.
    MainClass,
    /// `{classes}`: absolute sandbox path of the compile output directory.
    Classes,
    /// `{memory_bytes}`: the memory limit in bytes (the task's for the run,
    /// the compile step's own for the compile).
    MemoryBytes,
    /// `{sources}`: every source file of the task (one argument each).
    Sources,
}

impl Placeholder {
    /// Every placeholder, in the order error messages list them.
    pub const ALL: [Placeholder; 9] = [
        Placeholder::Interpreter,
        Placeholder::Compiler,
        Placeholder::Entry,
        Placeholder::Wrapper,
        Placeholder::Work,
        Placeholder::MainClass,
        Placeholder::Classes,
        Placeholder::MemoryBytes,
        Placeholder::Sources,
    ];

    /// The name between the braces.
    pub fn name(self) -> &'static str {
        match self {
            Placeholder::Interpreter => "interpreter",
            Placeholder::Compiler => "compiler",
            Placeholder::Entry => "entry",
            Placeholder::Wrapper => "wrapper",
            Placeholder::Work => "work",
            Placeholder::MainClass => "main_class",
            Placeholder::Classes => "classes",
            Placeholder::MemoryBytes => "memory_bytes",
            Placeholder::Sources => "sources",
        }
    }

    /// The placeholder called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Placeholder> {
        Placeholder::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.name())
    }
}

/// Which argv a template is, which decides the placeholders it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TemplateKind {
    /// `script_args`.
    Script,
    /// `handler.args`.
    Handler,
    /// `compile.args`.
    Compile,
}

impl TemplateKind {
    /// The placeholders accepted in this kind of template, given whether the
    /// runtime has a compile step.
    pub(crate) fn accepted(self, has_compile: bool) -> Vec<Placeholder> {
        use Placeholder as P;
        let mut accepted = vec![
            P::Interpreter,
            P::Entry,
            P::Work,
            P::MainClass,
            P::MemoryBytes,
        ];
        if has_compile {
            accepted.push(P::Classes);
        }
        match self {
            TemplateKind::Script => {}
            TemplateKind::Handler => accepted.push(P::Wrapper),
            TemplateKind::Compile => {
                accepted.push(P::Compiler);
                accepted.push(P::Sources);
            }
        }
        accepted.sort();
        accepted
    }
}

/// A piece of a parsed template argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// Literal text.
    Text(String),
    /// A placeholder to substitute.
    Var(Placeholder),
}

/// Why a template argument could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TemplateFault {
    /// `{name}` with a name that is no placeholder (or not allowed here).
    Unknown(String),
    /// A `{` without its `}`, or a lone `}`.
    Unbalanced,
    /// `{sources}` with other text in the same argument.
    SourcesNotAlone,
}

/// Parses one template argument into segments, checking only the syntax and
/// that every name is a known placeholder.
pub(crate) fn parse_arg(arg: &str) -> Result<Vec<Segment>, TemplateFault> {
    let mut segments = Vec::new();
    let mut text = String::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '}' => return Err(TemplateFault::Unbalanced),
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') | None => return Err(TemplateFault::Unbalanced),
                        Some(other) => name.push(other),
                    }
                }
                let var = Placeholder::from_name(&name).ok_or(TemplateFault::Unknown(name))?;
                if !text.is_empty() {
                    segments.push(Segment::Text(std::mem::take(&mut text)));
                }
                segments.push(Segment::Var(var));
            }
            other => text.push(other),
        }
    }
    if !text.is_empty() {
        segments.push(Segment::Text(text));
    }
    let has_sources = segments.contains(&Segment::Var(Placeholder::Sources));
    if has_sources && segments.len() != 1 {
        return Err(TemplateFault::SourcesNotAlone);
    }
    Ok(segments)
}

/// The values placeholders expand to; `None` where a value does not exist.
#[derive(Debug, Clone, Default)]
pub(crate) struct Values<'a> {
    pub interpreter: Option<&'a str>,
    pub compiler: Option<&'a str>,
    pub entry: Option<&'a str>,
    pub wrapper: Option<&'a str>,
    pub work: Option<&'a str>,
    pub main_class: Option<&'a str>,
    pub classes: Option<&'a str>,
    pub memory_bytes: Option<String>,
    pub sources: Option<&'a [String]>,
}

impl Values<'_> {
    fn single(&self, p: Placeholder) -> Option<&str> {
        match p {
            Placeholder::Interpreter => self.interpreter,
            Placeholder::Compiler => self.compiler,
            Placeholder::Entry => self.entry,
            Placeholder::Wrapper => self.wrapper,
            Placeholder::Work => self.work,
            Placeholder::MainClass => self.main_class,
            Placeholder::Classes => self.classes,
            Placeholder::MemoryBytes => self.memory_bytes.as_deref(),
            Placeholder::Sources => None,
        }
    }
}

/// Why a template could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExpandFault {
    /// The argument at this index does not parse.
    Parse(usize, TemplateFault),
    /// The argument at this index names a placeholder that has no value here.
    NoValue(usize, Placeholder),
}

/// Expands a whole argv template.
pub(crate) fn expand(args: &[String], values: &Values<'_>) -> Result<Vec<String>, ExpandFault> {
    let mut out = Vec::with_capacity(args.len());
    for (index, arg) in args.iter().enumerate() {
        let segments = parse_arg(arg).map_err(|fault| ExpandFault::Parse(index, fault))?;
        if segments == [Segment::Var(Placeholder::Sources)] {
            let sources = values
                .sources
                .ok_or(ExpandFault::NoValue(index, Placeholder::Sources))?;
            out.extend(sources.iter().cloned());
            continue;
        }
        let mut expanded = String::new();
        for segment in &segments {
            match segment {
                Segment::Text(text) => expanded.push_str(text),
                Segment::Var(p) => {
                    let value = values.single(*p).ok_or(ExpandFault::NoValue(index, *p))?;
                    expanded.push_str(value);
                }
            }
        }
        out.push(expanded);
    }
    Ok(out)
}

/// Lists placeholders as `{a}, {b}, {c}` for error messages.
pub(crate) fn list(placeholders: &[Placeholder]) -> String {
    placeholders
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_vars_and_escapes() {
        assert_eq!(
            parse_arg("-XX:MaxRAM={memory_bytes}").expect("valid"),
            vec![
                Segment::Text("-XX:MaxRAM=".into()),
                Segment::Var(Placeholder::MemoryBytes)
            ]
        );
        assert_eq!(
            parse_arg("{{literal}}").expect("valid"),
            vec![Segment::Text("{literal}".into())]
        );
        assert_eq!(parse_arg("").expect("valid"), vec![]);
    }

    #[test]
    fn rejects_bad_syntax() {
        assert_eq!(
            parse_arg("{nope}"),
            Err(TemplateFault::Unknown("nope".into()))
        );
        assert_eq!(parse_arg("{entry"), Err(TemplateFault::Unbalanced));
        assert_eq!(parse_arg("entry}"), Err(TemplateFault::Unbalanced));
        assert_eq!(parse_arg("{en{try}"), Err(TemplateFault::Unbalanced));
        assert_eq!(
            parse_arg("-s{sources}"),
            Err(TemplateFault::SourcesNotAlone)
        );
    }

    #[test]
    fn expands_sources_to_many_args() {
        let sources = vec!["/task/A.java".to_string(), "/task/b/B.java".to_string()];
        let values = Values {
            compiler: Some("/usr/bin/javac"),
            sources: Some(&sources),
            ..Values::default()
        };
        let args = vec!["{compiler}".to_string(), "{sources}".to_string()];
        assert_eq!(
            expand(&args, &values).expect("expands"),
            vec!["/usr/bin/javac", "/task/A.java", "/task/b/B.java"]
        );
    }

    #[test]
    fn missing_value_is_reported() {
        let args = vec!["{wrapper}".to_string()];
        assert_eq!(
            expand(&args, &Values::default()),
            Err(ExpandFault::NoValue(0, Placeholder::Wrapper))
        );
    }

    #[test]
    fn accepted_sets_depend_on_kind() {
        assert!(
            !TemplateKind::Script
                .accepted(false)
                .contains(&Placeholder::Wrapper)
        );
        assert!(
            TemplateKind::Handler
                .accepted(false)
                .contains(&Placeholder::Wrapper)
        );
        assert!(
            !TemplateKind::Script
                .accepted(false)
                .contains(&Placeholder::Classes)
        );
        assert!(
            TemplateKind::Script
                .accepted(true)
                .contains(&Placeholder::Classes)
        );
        assert!(
            TemplateKind::Compile
                .accepted(true)
                .contains(&Placeholder::Sources)
        );
        assert!(
            !TemplateKind::Script
                .accepted(true)
                .contains(&Placeholder::Sources)
        );
    }
}
