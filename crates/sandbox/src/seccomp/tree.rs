//! A seccomp-bpf program laid out as a search tree over system call
//! numbers.
//!
//! `seccompiler` writes a filter as one linear list of comparisons. The
//! kernel, when it loads a filter, runs it for every system call number of
//! every architecture it knows to find those always allowed (its action
//! cache), so a linear list costs its length times the number of calls:
//! 296 µs for our 681-instruction task filter against tens of microseconds
//! for the same policy as a tree (see docs/benchmarks.md). A task calls
//! through the filter no faster or slower for it: the calls that matter are
//! in the cache either way.
//!
//! The policy is the same data `seccompiler` is given: a default of allow,
//! and per number either a refusal or a refusal under argument conditions.
//! [`compile`] lays it out; the tests check, with a small interpreter of
//! classic BPF, that it decides exactly like `seccompiler`'s list for
//! every number, architecture and argument pattern tried.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, sock_filter};

// Classic BPF (linux/bpf_common.h, linux/filter.h).
// BPF_LD | BPF_W | BPF_ABS (the first two are 0).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_ALU_AND_K: u16 = 0x04 | 0x50;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;

// struct seccomp_data.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARGS_OFFSET: u32 = 16;

/// `SECCOMP_RET_ALLOW`.
pub(crate) const RET_ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_ERRNO`; the errno goes in the low 16 bits.
pub(crate) const RET_ERRNO: u32 = 0x0005_0000;
/// `SECCOMP_RET_KILL_PROCESS`: a call of another architecture.
pub(crate) const RET_KILL_PROCESS: u32 = 0x8000_0000;

/// The audit architecture our filters admit (any other is killed, as
/// `seccompiler` does).
#[cfg(target_arch = "x86_64")]
pub(crate) const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
pub(crate) const AUDIT_ARCH: u32 = 0xc000_00b7;

/// One condition on an argument's low 32 bits: `(arg & mask) == value`,
/// or `!=` when `equal` is false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ArgCheck {
    /// Argument index, 0 to 5.
    pub arg: u8,
    /// Bits compared.
    pub mask: u32,
    /// Their expected value.
    pub value: u32,
    /// Whether the bits must equal `value` (else differ from it).
    pub equal: bool,
}

impl ArgCheck {
    /// `(arg & mask) == value`.
    pub(crate) fn eq(arg: u8, mask: u32, value: u32) -> Self {
        Self {
            arg,
            mask,
            value,
            equal: true,
        }
    }

    /// `(arg & mask) != value`.
    pub(crate) fn ne(arg: u8, mask: u32, value: u32) -> Self {
        Self {
            arg,
            mask,
            value,
            equal: false,
        }
    }
}

/// What the filter does with one system call number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Verdict {
    /// Refused with this errno, whatever the arguments.
    Refuse(u16),
    /// Refused with this errno when any of the rules holds, a rule holding
    /// when all of its checks do (`seccompiler`'s rules and conditions);
    /// else allowed.
    RefuseIf(u16, Vec<Vec<ArgCheck>>),
}

/// One instruction of a program under construction: final, or a jump to
/// a label resolved at the end.
enum Ins {
    Op(sock_filter),
    Ja(usize),
}

fn op(code: u16, jt: u8, jf: u8, k: u32) -> Ins {
    Ins::Op(sock_filter { code, jt, jf, k })
}

/// Numbers a leaf of the search tree compares one by one.
const LEAF_KEYS: usize = 6;

/// The filter of `policy`: every number in it gets its verdict, every other
/// number of this architecture is allowed, and a call of another
/// architecture kills the process.
pub(crate) fn compile(policy: &BTreeMap<u32, Verdict>) -> BpfProgram {
    let mut code = vec![
        op(BPF_LD_W_ABS, 0, 0, ARCH_OFFSET),
        op(BPF_JMP_JEQ_K, 1, 0, AUDIT_ARCH),
        op(BPF_RET_K, 0, 0, RET_KILL_PROCESS),
        op(BPF_LD_W_ABS, 0, 0, NR_OFFSET),
    ];
    // Verdicts with conditions get a block of their own after the tree
    // (label = index in `blocks`); plain refusals return in place.
    let mut blocks: Vec<&Verdict> = policy
        .values()
        .filter(|v| matches!(v, Verdict::RefuseIf(..)))
        .collect();
    blocks.sort();
    blocks.dedup();
    let keys: Vec<(u32, &Verdict)> = policy.iter().map(|(&nr, v)| (nr, v)).collect();
    code.extend(tree(&keys, &blocks));

    let mut at = vec![0usize; blocks.len()];
    for (label, verdict) in blocks.iter().enumerate() {
        at[label] = code.len();
        if let Verdict::RefuseIf(errno, rules) = verdict {
            // Each check: load, mask, compare. A check that holds goes on to
            // the rule's next check, or to the refusal after the last; one
            // that fails goes to the next rule, or to the allow after the
            // last. Positions are relative to the block's start.
            let total: usize = rules.iter().map(|r| 3 * r.len()).sum();
            let (allow, refuse) = (total, total + 1);
            let mut start = 0;
            for rule in rules {
                assert!(!rule.is_empty(), "a rule has at least one check");
                let next_rule = start + 3 * rule.len();
                for (i, c) in rule.iter().enumerate() {
                    let after = start + 3 * i + 3;
                    let holds = if i + 1 == rule.len() { refuse } else { after };
                    let fails = if next_rule == total { allow } else { next_rule };
                    let (jt, jf) = if c.equal {
                        (holds, fails)
                    } else {
                        (fails, holds)
                    };
                    let rel = |to: usize| u8::try_from(to - after).expect("few checks per call");
                    code.push(op(BPF_LD_W_ABS, 0, 0, ARGS_OFFSET + 8 * u32::from(c.arg)));
                    code.push(op(BPF_ALU_AND_K, 0, 0, c.mask));
                    code.push(op(BPF_JMP_JEQ_K, rel(jt), rel(jf), c.value));
                }
                start = next_rule;
            }
            code.push(op(BPF_RET_K, 0, 0, RET_ALLOW));
            code.push(op(BPF_RET_K, 0, 0, RET_ERRNO | u32::from(*errno)));
        }
    }
    code.into_iter()
        .enumerate()
        .map(|(i, ins)| match ins {
            Ins::Op(f) => f,
            // A `ja` jumps k instructions past the next one.
            Ins::Ja(label) => sock_filter {
                code: BPF_JMP_JA,
                jt: 0,
                jf: 0,
                #[allow(
                    clippy::cast_possible_truncation,
                    reason = "a jump within a program of at most BPF_MAXINSNS (4096) instructions"
                )]
                k: (at[label] - i - 1) as u32,
            },
        })
        .collect()
}

/// The search over `keys` (sorted), the number in the accumulator; falls
/// to allow. `blocks` are the labels of the conditional verdicts.
fn tree(keys: &[(u32, &Verdict)], blocks: &[&Verdict]) -> Vec<Ins> {
    if keys.len() <= LEAF_KEYS {
        // jeq per number to its verdict's stub after the allow: a return,
        // or a long jump to its block.
        let mut stubs: Vec<&Verdict> = keys.iter().map(|(_, v)| *v).collect();
        stubs.sort();
        stubs.dedup();
        let mut code = Vec::new();
        for (i, (nr, v)) in keys.iter().enumerate() {
            let stub = stubs.binary_search(v).expect("listed");
            // Past the remaining compares and the allow, to the stub.
            let jt = keys.len() - i - 1 + 1 + stub;
            code.push(op(
                BPF_JMP_JEQ_K,
                u8::try_from(jt).expect("a leaf is short"),
                0,
                *nr,
            ));
        }
        code.push(op(BPF_RET_K, 0, 0, RET_ALLOW));
        for v in stubs {
            code.push(match v {
                Verdict::Refuse(errno) => op(BPF_RET_K, 0, 0, RET_ERRNO | u32::from(*errno)),
                Verdict::RefuseIf(..) => {
                    Ins::Ja(blocks.binary_search(&v).expect("a block per condition"))
                }
            });
        }
        return code;
    }
    let mid = keys.len() / 2;
    let lower = tree(&keys[..mid], blocks);
    let upper = tree(&keys[mid..], blocks);
    let mut code = Vec::with_capacity(lower.len() + upper.len() + 2);
    match u8::try_from(lower.len()) {
        // At or above the middle number: over the lower half.
        Ok(skip) => code.push(op(BPF_JMP_JGE_K, skip, 0, keys[mid].0)),
        Err(_) => {
            code.push(op(BPF_JMP_JGE_K, 0, 1, keys[mid].0));
            #[allow(
                clippy::cast_possible_truncation,
                reason = "at most BPF_MAXINSNS (4096) instructions"
            )]
            let skip = lower.len() as u32;
            code.push(op(BPF_JMP_JA, 0, 0, skip));
        }
    }
    code.extend(lower);
    code.extend(upper);
    code
}

/// A classic BPF interpreter for the instructions seccomp filters use, run
/// on a `struct seccomp_data` (for tests).
#[cfg(test)]
pub(crate) fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let word = |off: u32| -> u32 {
        match off {
            NR_OFFSET => nr,
            ARCH_OFFSET => arch,
            o if (ARGS_OFFSET..ARGS_OFFSET + 48).contains(&o) && o.is_multiple_of(4) => {
                let a = args[((o - ARGS_OFFSET) / 8) as usize];
                if (o - ARGS_OFFSET).is_multiple_of(8) {
                    #[allow(
                        clippy::cast_possible_truncation,
                        reason = "the argument's low word, by design"
                    )]
                    let low = a as u32;
                    low
                } else {
                    (a >> 32) as u32
                }
            }
            o => panic!("load from offset {o}"),
        }
    };
    let mut acc = 0u32;
    let mut pc = 0usize;
    loop {
        let i = &prog[pc];
        pc += 1;
        match i.code {
            BPF_LD_W_ABS => acc = word(i.k),
            BPF_ALU_AND_K => acc &= i.k,
            BPF_JMP_JA => pc += i.k as usize,
            BPF_RET_K => return i.k,
            c if c & 0x07 == 0x05 => {
                let taken = match c & 0xf0 {
                    0x10 => acc == i.k,
                    0x20 => acc > i.k,
                    0x30 => acc >= i.k,
                    0x40 => acc & i.k != 0,
                    op => panic!("jump op {op:#x}"),
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            c => panic!("instruction {c:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_policy_decides_each_number_and_the_architecture() {
        let mut policy = BTreeMap::new();
        for nr in [3u32, 7, 9, 20, 21, 22, 40, 41, 100, 0x4000_0007] {
            policy.insert(nr, Verdict::Refuse(1));
        }
        policy.insert(
            56,
            Verdict::RefuseIf(1, vec![vec![ArgCheck::eq(0, 0x10, 0x10)]]),
        );
        // Refused when arg 0 is 5 and arg 2 is not 0, or arg 1 is 7.
        policy.insert(
            57,
            Verdict::RefuseIf(
                2,
                vec![
                    vec![ArgCheck::eq(0, u32::MAX, 5), ArgCheck::ne(2, u32::MAX, 0)],
                    vec![ArgCheck::eq(1, 0xf, 7)],
                ],
            ),
        );
        let prog = compile(&policy);
        for nr in 0..200u32 {
            let want = match policy.get(&nr) {
                Some(Verdict::Refuse(_)) => RET_ERRNO | 1,
                _ => RET_ALLOW,
            };
            assert_eq!(run(&prog, nr, AUDIT_ARCH, [0; 6]), want, "nr {nr}");
        }
        assert_eq!(run(&prog, 0x4000_0007, AUDIT_ARCH, [0; 6]), RET_ERRNO | 1);
        assert_eq!(run(&prog, 0x4000_0008, AUDIT_ARCH, [0; 6]), RET_ALLOW);
        assert_eq!(
            run(&prog, 56, AUDIT_ARCH, [0x11, 0, 0, 0, 0, 0]),
            RET_ERRNO | 1
        );
        assert_eq!(
            run(&prog, 56, AUDIT_ARCH, [0x1_0000_0000, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(run(&prog, 3, 0x4000_0003, [0; 6]), RET_KILL_PROCESS);
        for (args, want) in [
            ([5, 0, 0, 0, 0, 0], RET_ALLOW),
            ([5, 0, 9, 0, 0, 0], RET_ERRNO | 2),
            ([4, 0, 9, 0, 0, 0], RET_ALLOW),
            ([4, 0x17, 0, 0, 0, 0], RET_ERRNO | 2),
            ([5, 0x17, 0, 0, 0, 0], RET_ERRNO | 2),
            ([5 | 1 << 32, 0, 1 << 32, 0, 0, 0], RET_ALLOW),
        ] {
            assert_eq!(run(&prog, 57, AUDIT_ARCH, args), want, "{args:x?}");
        }
    }

    #[test]
    fn far_targets_are_reached_through_long_jumps() {
        // Enough numbers for the tree's halves to outgrow 8-bit offsets,
        // and a conditional verdict early in the tree whose block is at the
        // end.
        let mut policy: BTreeMap<u32, Verdict> = (2..2000u32)
            .step_by(2)
            .map(|nr| (nr, Verdict::Refuse(13)))
            .collect();
        let check = ArgCheck::eq(1, 0xff, 0x2a);
        policy.insert(1, Verdict::RefuseIf(7, vec![vec![check]]));
        let prog = compile(&policy);
        assert!(
            prog.iter().any(|i| i.code == BPF_JMP_JA && i.k > 255),
            "a long jump is used"
        );
        for nr in 0..2100u32 {
            let want = if (2..2000).contains(&nr) && nr % 2 == 0 {
                RET_ERRNO | 13
            } else {
                RET_ALLOW
            };
            assert_eq!(run(&prog, nr, AUDIT_ARCH, [0; 6]), want, "nr {nr}");
        }
        assert_eq!(
            run(&prog, 1, AUDIT_ARCH, [0, 0x12a, 0, 0, 0, 0]),
            RET_ERRNO | 7
        );
        assert_eq!(run(&prog, 1, AUDIT_ARCH, [0, 0x12b, 0, 0, 0, 0]), RET_ALLOW);
    }
}
