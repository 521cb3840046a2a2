//! The runtime catalogue of taskexec and the plans it makes for a task.
//!
//! * [`Catalogue`]: the runtimes taskexec knows (python, node, java, bash),
//!   as data from the embedded `runtimes.toml`, optionally merged with an
//!   operator catalogue. Argv templates are checked at load time.
//! * [`Catalogue::resolve`]: finds a runtime's interpreter and compiler on
//!   this host (absolute candidate paths only, symlinks followed) and the
//!   host paths the sandbox must bind: a [`ResolvedRuntime`].
//! * [`plan()`]: turns a resolved runtime and a task definition into a
//!   [`Plan`]: the files to write into `/task`, the handler wrapper to place
//!   under `/opt/taskexec`, the compile step if any, and the run argv.
//! * [`wrappers`]: the handler-mode wrappers embedded in the binary.

pub mod catalogue;
pub mod layout;
pub mod plan;
pub mod resolve;
pub mod template;
pub mod wrappers;

pub use catalogue::{
    BUILTIN_CATALOGUE, ByteSize, Catalogue, CatalogueError, CompileSpec, HandlerSpec, MountSpec,
    RuntimeSpec, VersionStream,
};
pub use plan::{CompileStep, Plan, PlanError, PlanFile, main_class, plan};
pub use resolve::{MountPath, ResolvedRuntime, RuntimeError, expand_pattern};
pub use template::Placeholder;
