//! The x86 page-table walks of the human monitor's `info tlb` and `info mem` (QEMU's
//! `target/i386/monitor.c`): from a CPU's paging registers and guest-physical memory,
//! every mapping (`info tlb`) or every range of like protection (`info mem`), in QEMU's
//! formats for 32-bit, PAE, 4-level and 5-level paging.
//!
//! Pure functions over a memory reader, so they can be checked without a guest; they
//! follow QEMU's walks entry for entry, its quirks included (which bits go into the
//! printed address, the 5-level `info mem` walk's inverted presence tests), since the
//! point is to print what QEMU prints.

use std::fmt::Write as _;

use hw::core::accel_ops::PagingRegisters;

const PG_PRESENT: u64 = 1 << 0;
const PG_RW: u64 = 1 << 1;
const PG_USER: u64 = 1 << 2;
const PG_PWT: u64 = 1 << 3;
const PG_PCD: u64 = 1 << 4;
const PG_ACCESSED: u64 = 1 << 5;
const PG_DIRTY: u64 = 1 << 6;
const PG_PSE: u64 = 1 << 7;
const PG_GLOBAL: u64 = 1 << 8;
const PG_NX: u64 = 1 << 63;
/// The bits `info mem` compares: user, writable, present.
const PROT_MASK: u64 = PG_USER | PG_RW | PG_PRESENT;
/// QEMU's mask of a table's address in an entry (52-bit physical addresses).
const ADDR_MASK: u64 = 0x3_ffff_ffff_f000;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Reads guest-physical memory (QEMU's `cpu_physical_memory_read`).
pub type ReadPhys<'a> = &'a dyn Fn(u64, &mut [u8]);

/// The paging mode the registers select, or QEMU's message when paging is off.
enum Mode {
    Bits32,
    Pae32,
    La48,
    La57,
}

fn mode(regs: &PagingRegisters) -> Option<Mode> {
    if regs.cr0 & CR0_PG == 0 {
        return None;
    }
    Some(if regs.cr4 & CR4_PAE == 0 {
        Mode::Bits32
    } else if regs.efer & EFER_LMA == 0 {
        Mode::Pae32
    } else if regs.cr4 & CR4_LA57 != 0 {
        Mode::La57
    } else {
        Mode::La48
    })
}

/// A page table of 8-byte entries (`count` of them) at `addr`.
fn table64(read: ReadPhys, addr: u64, count: usize) -> Vec<u64> {
    let mut bytes = vec![0u8; count * 8];
    read(addr, &mut bytes);
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// A 32-bit paging table (1024 4-byte entries) at `addr`.
fn table32(read: ReadPhys, addr: u64) -> Vec<u64> {
    let mut bytes = vec![0u8; 4096];
    read(addr, &mut bytes);
    bytes
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_le_bytes(c.try_into().expect("4 bytes"))))
        .collect()
}

/// QEMU's `addr_canonical`: sign-extends a linear address from bit 47 (bit 56 with LA57).
fn canonical(regs: &PagingRegisters, addr: u64) -> u64 {
    let bit = if regs.cr4 & CR4_LA57 != 0 { 56 } else { 47 };
    if addr & (1 << bit) != 0 {
        addr | (u64::MAX << (bit + 1))
    } else {
        addr
    }
}

/// The most lines `info tlb` or `info mem` prints at once: about 6 MiB of text, well under
/// what a monitor client may have queued (`client::MAX_QUEUED`), JSON escapes included.
pub const MAX_LINES: usize = 1 << 17;
/// The most page tables one walk reads (256 MiB of guest memory): tables that point back
/// at themselves (a self-mapped PML4) or at one another can make a walk visit billions.
pub const MAX_TABLES: usize = 1 << 16;

/// How much of a page-table walk `info tlb` and `info mem` do at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkLimits {
    /// Lines printed.
    pub lines: usize,
    /// Page tables read (the top-level one included).
    pub tables: usize,
}

impl Default for WalkLimits {
    fn default() -> Self {
        WalkLimits {
            lines: MAX_LINES,
            tables: MAX_TABLES,
        }
    }
}

/// Why a walk stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Lines,
    Tables,
}

/// A walk in progress: its output and what is left of its budget, and for `info mem` the
/// range being gathered and its protection (QEMU's `mem_print` state).
struct Walk<'a> {
    out: String,
    regs: &'a PagingRegisters,
    read: ReadPhys<'a>,
    limits: WalkLimits,
    lines: usize,
    tables: usize,
    stop: Option<Stop>,
    start: u64,
    last_prot: u64,
}

impl<'a> Walk<'a> {
    fn new(regs: &'a PagingRegisters, read: ReadPhys<'a>, limits: WalkLimits) -> Self {
        Walk {
            out: String::new(),
            regs,
            read,
            limits,
            lines: 0,
            tables: 0,
            stop: None,
            start: u64::MAX,
            last_prot: 0,
        }
    }

    fn stopped(&self) -> bool {
        self.stop.is_some()
    }

    /// Takes one table from the budget; `false` (and the walk stops) when none is left.
    fn take_table(&mut self) -> bool {
        if self.stop.is_some() {
            return false;
        }
        if self.tables >= self.limits.tables {
            self.stop = Some(Stop::Tables);
            return false;
        }
        self.tables += 1;
        true
    }

    /// [`table64`] within the budget: no entries once it is spent.
    fn table64(&mut self, addr: u64, count: usize) -> Vec<u64> {
        if self.take_table() {
            table64(self.read, addr, count)
        } else {
            Vec::new()
        }
    }

    /// [`table32`] within the budget.
    fn table32(&mut self, addr: u64) -> Vec<u64> {
        if self.take_table() {
            table32(self.read, addr)
        } else {
            Vec::new()
        }
    }

    /// Takes one line from the budget; `false` (and the walk stops) when none is left.
    fn take_line(&mut self) -> bool {
        if self.stop.is_some() {
            return false;
        }
        if self.lines >= self.limits.lines {
            self.stop = Some(Stop::Lines);
            return false;
        }
        self.lines += 1;
        true
    }

    /// QEMU's `print_pte`: `VADDR: PADDR XGPDACTUW`.
    fn pte(&mut self, addr: u64, pte: u64, mask: u64) {
        if !self.take_line() {
            return;
        }
        let flag = |bit: u64, c: char| if pte & bit != 0 { c } else { '-' };
        let _ = writeln!(
            self.out,
            "{:016x}: {:016x} {}{}{}{}{}{}{}{}{}",
            canonical(self.regs, addr),
            pte & mask,
            flag(PG_NX, 'X'),
            flag(PG_GLOBAL, 'G'),
            flag(PG_PSE, 'P'),
            flag(PG_DIRTY, 'D'),
            flag(PG_ACCESSED, 'A'),
            flag(PG_PCD, 'C'),
            flag(PG_PWT, 'T'),
            flag(PG_USER, 'U'),
            flag(PG_RW, 'W'),
        );
    }

    /// QEMU's `mem_print`: a change of protection at `end` ends the range before it.
    fn at(&mut self, end: u64, prot: u64) {
        if prot == self.last_prot || self.stopped() {
            return;
        }
        if self.start != u64::MAX {
            if !self.take_line() {
                return;
            }
            let c = |a: u64| canonical(self.regs, a);
            let _ = writeln!(
                self.out,
                "{:016x}-{:016x} {:016x} {}r{}",
                c(self.start),
                c(end),
                c(end.wrapping_sub(self.start)),
                if self.last_prot & PG_USER != 0 {
                    'u'
                } else {
                    '-'
                },
                if self.last_prot & PG_RW != 0 {
                    'w'
                } else {
                    '-'
                },
            );
        }
        self.start = if prot != 0 { end } else { u64::MAX };
        self.last_prot = prot;
    }

    /// The output, with a last line that says where the walk stopped, if it did.
    fn finish(mut self, what: &str) -> String {
        match self.stop {
            None => {}
            Some(Stop::Lines) => {
                let _ = writeln!(
                    self.out,
                    "({what} stopped after {} lines: qomvm prints at most that many at once)",
                    self.limits.lines
                );
            }
            Some(Stop::Tables) => {
                let _ = writeln!(
                    self.out,
                    "({what} stopped after reading {} page tables: qomvm walks at most that \
                     many at once)",
                    self.limits.tables
                );
            }
        }
        self.out
    }
}

/// QEMU's `hmp_info_tlb` once it has the CPU: every present mapping, up to
/// [`WalkLimits::default`].
pub fn info_tlb(regs: &PagingRegisters, read: ReadPhys) -> String {
    info_tlb_limited(regs, read, WalkLimits::default())
}

/// [`info_tlb`] within `limits`. QEMU prints as it walks and has no limit; qomvm's
/// monitor hands a command's whole output to its client at once, so it stops at the
/// limit and says so on a last line.
pub fn info_tlb_limited(regs: &PagingRegisters, read: ReadPhys, limits: WalkLimits) -> String {
    let mut w = Walk::new(regs, read, limits);
    match mode(regs) {
        None => w.out.push_str("PG disabled\n"),
        Some(Mode::Bits32) => tlb_32(&mut w),
        Some(Mode::Pae32) => tlb_pae32(&mut w),
        Some(Mode::La48) => tlb_la48(&mut w, 0, regs.cr3 & ADDR_MASK),
        Some(Mode::La57) => {
            for (l0, pml5e) in w.table64(regs.cr3 & ADDR_MASK, 512).into_iter().enumerate() {
                if w.stopped() {
                    break;
                }
                if pml5e & PG_PRESENT != 0 {
                    tlb_la48(&mut w, l0 as u64, pml5e & ADDR_MASK);
                }
            }
        }
    }
    w.finish("info tlb")
}

fn tlb_32(w: &mut Walk) {
    let pgd = w.regs.cr3 & 0xffff_f000;
    for (l1, pde) in w.table32(pgd).into_iter().enumerate() {
        let l1 = l1 as u64;
        if w.stopped() {
            return;
        }
        if pde & PG_PRESENT == 0 {
            continue;
        }
        if pde & PG_PSE != 0 && w.regs.cr4 & CR4_PSE != 0 {
            // 4M pages: QEMU masks with ~((1 << 21) - 1).
            w.pte(l1 << 22, pde, !((1 << 21) - 1));
            continue;
        }
        for (l2, pte) in w.table32(pde & 0xffff_f000).into_iter().enumerate() {
            if pte & PG_PRESENT != 0 {
                let addr = (l1 << 22) + ((l2 as u64) << 12);
                w.pte(addr, pte & !PG_PSE, !0xfff);
            }
        }
    }
}

fn tlb_pae32(w: &mut Walk) {
    for (l1, pdpe) in w.table64(w.regs.cr3 & !0x1f, 4).into_iter().enumerate() {
        let l1 = l1 as u64;
        if w.stopped() {
            return;
        }
        if pdpe & PG_PRESENT == 0 {
            continue;
        }
        for (l2, pde) in w.table64(pdpe & ADDR_MASK, 512).into_iter().enumerate() {
            let l2 = l2 as u64;
            if w.stopped() {
                return;
            }
            if pde & PG_PRESENT == 0 {
                continue;
            }
            if pde & PG_PSE != 0 {
                // 2M pages (CR4.PSE does not matter with PAE): QEMU's ~((1 << 20) - 1).
                w.pte((l1 << 30) + (l2 << 21), pde, !((1 << 20) - 1));
                continue;
            }
            for (l3, pte) in w.table64(pde & ADDR_MASK, 512).into_iter().enumerate() {
                if pte & PG_PRESENT != 0 {
                    let addr = (l1 << 30) + (l2 << 21) + ((l3 as u64) << 12);
                    w.pte(addr, pte & !PG_PSE, !0xfff);
                }
            }
        }
    }
}

fn tlb_la48(w: &mut Walk, l0: u64, pml4: u64) {
    for (l1, pml4e) in w.table64(pml4, 512).into_iter().enumerate() {
        let l1 = l1 as u64;
        if w.stopped() {
            return;
        }
        if pml4e & PG_PRESENT == 0 {
            continue;
        }
        for (l2, pdpe) in w.table64(pml4e & ADDR_MASK, 512).into_iter().enumerate() {
            let l2 = l2 as u64;
            if w.stopped() {
                return;
            }
            if pdpe & PG_PRESENT == 0 {
                continue;
            }
            let base = (l0 << 48) + (l1 << 39) + (l2 << 30);
            if pdpe & PG_PSE != 0 {
                w.pte(base, pdpe, 0x3_ffff_c000_0000);
                continue;
            }
            for (l3, pde) in w.table64(pdpe & ADDR_MASK, 512).into_iter().enumerate() {
                let l3 = l3 as u64;
                if w.stopped() {
                    return;
                }
                if pde & PG_PRESENT == 0 {
                    continue;
                }
                if pde & PG_PSE != 0 {
                    w.pte(base + (l3 << 21), pde, 0x3_ffff_ffe0_0000);
                    continue;
                }
                for (l4, pte) in w.table64(pde & ADDR_MASK, 512).into_iter().enumerate() {
                    if pte & PG_PRESENT != 0 {
                        let addr = base + (l3 << 21) + ((l4 as u64) << 12);
                        w.pte(addr, pte & !PG_PSE, ADDR_MASK);
                    }
                }
            }
        }
    }
}

/// QEMU's `hmp_info_mem` once it has the CPU: the mapped ranges and their protection, up
/// to [`WalkLimits::default`].
pub fn info_mem(regs: &PagingRegisters, read: ReadPhys) -> String {
    info_mem_limited(regs, read, WalkLimits::default())
}

/// [`info_mem`] within `limits` (see [`info_tlb_limited`]).
pub fn info_mem_limited(regs: &PagingRegisters, read: ReadPhys, limits: WalkLimits) -> String {
    let mut w = Walk::new(regs, read, limits);
    let Some(mode) = mode(regs) else {
        w.out.push_str("PG disabled\n");
        return w.out;
    };
    match mode {
        Mode::Bits32 => mem_32(&mut w),
        Mode::Pae32 => mem_pae32(&mut w),
        Mode::La48 => mem_la48(&mut w),
        Mode::La57 => mem_la57(&mut w),
    }
    w.finish("info mem")
}

fn mem_32(w: &mut Walk) {
    let pgd = w.regs.cr3 & 0xffff_f000;
    for (l1, pde) in w.table32(pgd).into_iter().enumerate() {
        let l1 = l1 as u64;
        if pde & PG_PRESENT == 0 {
            w.at(l1 << 22, 0);
        } else if pde & PG_PSE != 0 && w.regs.cr4 & CR4_PSE != 0 {
            w.at(l1 << 22, pde & PROT_MASK);
        } else {
            for (l2, pte) in w.table32(pde & 0xffff_f000).into_iter().enumerate() {
                let prot = if pte & PG_PRESENT != 0 {
                    pte & pde & PROT_MASK
                } else {
                    0
                };
                w.at((l1 << 22) + ((l2 as u64) << 12), prot);
            }
        }
        if w.stopped() {
            return;
        }
    }
    w.at(1 << 32, 0);
}

fn mem_pae32(w: &mut Walk) {
    for (l1, pdpe) in w.table64(w.regs.cr3 & !0x1f, 4).into_iter().enumerate() {
        let l1 = l1 as u64;
        if pdpe & PG_PRESENT == 0 {
            w.at(l1 << 30, 0);
            continue;
        }
        for (l2, pde) in w.table64(pdpe & ADDR_MASK, 512).into_iter().enumerate() {
            let end = (l1 << 30) + ((l2 as u64) << 21);
            if pde & PG_PRESENT == 0 {
                w.at(end, 0);
            } else if pde & PG_PSE != 0 {
                w.at(end, pde & PROT_MASK);
            } else {
                for (l3, pte) in w.table64(pde & ADDR_MASK, 512).into_iter().enumerate() {
                    let prot = if pte & PG_PRESENT != 0 {
                        pte & pde & PROT_MASK
                    } else {
                        0
                    };
                    w.at(end + ((l3 as u64) << 12), prot);
                }
            }
            if w.stopped() {
                return;
            }
        }
    }
    w.at(1 << 32, 0);
}

fn mem_la48(w: &mut Walk) {
    for (l1, pml4e) in w
        .table64(w.regs.cr3 & ADDR_MASK, 512)
        .into_iter()
        .enumerate()
    {
        let l1 = l1 as u64;
        if pml4e & PG_PRESENT == 0 {
            w.at(l1 << 39, 0);
            continue;
        }
        for (l2, pdpe) in w.table64(pml4e & ADDR_MASK, 512).into_iter().enumerate() {
            let base = (l1 << 39) + ((l2 as u64) << 30);
            if w.stopped() {
                return;
            }
            if pdpe & PG_PRESENT == 0 {
                w.at(base, 0);
                continue;
            }
            if pdpe & PG_PSE != 0 {
                w.at(base, pdpe & PROT_MASK & pml4e);
                continue;
            }
            for (l3, pde) in w.table64(pdpe & ADDR_MASK, 512).into_iter().enumerate() {
                let end = base + ((l3 as u64) << 21);
                if pde & PG_PRESENT == 0 {
                    w.at(end, 0);
                } else if pde & PG_PSE != 0 {
                    w.at(end, pde & PROT_MASK & pml4e & pdpe);
                } else {
                    for (l4, pte) in w.table64(pde & ADDR_MASK, 512).into_iter().enumerate() {
                        let prot = if pte & PG_PRESENT != 0 {
                            pte & PROT_MASK & pml4e & pdpe & pde
                        } else {
                            0
                        };
                        w.at(end + ((l4 as u64) << 12), prot);
                    }
                }
                if w.stopped() {
                    return;
                }
            }
        }
    }
    w.at(1 << 48, 0);
}

/// QEMU's `mem_info_la57`, whose presence tests below the PML4 are inverted (it skips
/// present PDPT and PD entries and walks absent ones): kept, to print what QEMU prints.
fn mem_la57(w: &mut Walk) {
    for (l0, pml5e) in w
        .table64(w.regs.cr3 & ADDR_MASK, 512)
        .into_iter()
        .enumerate()
    {
        let l0 = l0 as u64;
        if pml5e & PG_PRESENT == 0 {
            w.at(l0 << 48, 0);
            continue;
        }
        for (l1, pml4e) in w.table64(pml5e & ADDR_MASK, 512).into_iter().enumerate() {
            let l1 = l1 as u64;
            if w.stopped() {
                return;
            }
            if pml4e & PG_PRESENT == 0 {
                w.at((l0 << 48) + (l1 << 39), 0);
                continue;
            }
            for (l2, pdpe) in w.table64(pml4e & ADDR_MASK, 512).into_iter().enumerate() {
                let base = (l0 << 48) + (l1 << 39) + ((l2 as u64) << 30);
                if w.stopped() {
                    return;
                }
                if pdpe & PG_PRESENT != 0 {
                    w.at(base, 0);
                    continue;
                }
                if pdpe & PG_PSE != 0 {
                    w.at(base, pdpe & PROT_MASK & pml5e & pml4e);
                    continue;
                }
                for (l3, pde) in w.table64(pdpe & ADDR_MASK, 512).into_iter().enumerate() {
                    let end = base + ((l3 as u64) << 21);
                    if w.stopped() {
                        return;
                    }
                    if pde & PG_PRESENT != 0 {
                        w.at(end, 0);
                        continue;
                    }
                    if pde & PG_PSE != 0 {
                        w.at(end, pde & PROT_MASK & pml5e & pml4e & pdpe);
                        continue;
                    }
                    for (l4, pte) in w.table64(pde & ADDR_MASK, 512).into_iter().enumerate() {
                        let prot = if pte & PG_PRESENT != 0 {
                            pte & PROT_MASK & pml5e & pml4e & pdpe & pde
                        } else {
                            0
                        };
                        w.at(end + ((l4 as u64) << 12), prot);
                    }
                }
            }
        }
    }
    w.at(1 << 57, 0);
}

/// QEMU's `PG_ADDRESS_MASK`: the address bits of an entry its debug walk keeps.
const PG_ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// QEMU 7.2's `x86_cpu_get_phys_page_attrs_debug` (`gva2gpa`, `x`): the guest-physical
/// address of the page holding `addr` as the CPU's page tables map it, `None` where
/// they do not. Like QEMU's, this walk tests only presence and, in long mode, that the
/// address is canonical: it ignores reserved bits, so a page with the NX bit set while
/// EFER.NXE is off, or a 1 GiB page on a CPU without pdpe1gb, translates (the CPU itself
/// would fault; KVM_TRANSLATE refuses them).
pub fn translate_page(regs: &PagingRegisters, read: ReadPhys, addr: u64) -> Option<u64> {
    let addr = addr & !0xfff;
    let ld64 = |at: u64| {
        let mut b = [0u8; 8];
        read(at, &mut b);
        u64::from_le_bytes(b)
    };
    let ld32 = |at: u64| {
        let mut b = [0u8; 4];
        read(at, &mut b);
        u64::from(u32::from_le_bytes(b))
    };
    let present = |e: u64| (e & PG_PRESENT != 0).then_some(e);
    let (pte, page_size): (u64, u64) = if regs.cr0 & CR0_PG == 0 {
        (addr, 1 << 12)
    } else if regs.cr4 & CR4_PAE != 0 {
        let pdpe = if regs.efer & EFER_LMA != 0 {
            let la57 = regs.cr4 & CR4_LA57 != 0;
            let sext = (addr as i64) >> if la57 { 56 } else { 47 };
            if sext != 0 && sext != -1 {
                return None;
            }
            let pml5e = if la57 {
                present(ld64((regs.cr3 & !0xfff) + (((addr >> 48) & 0x1ff) << 3)))?
            } else {
                regs.cr3
            };
            let pml4e = present(ld64(
                (pml5e & PG_ADDRESS_MASK) + (((addr >> 39) & 0x1ff) << 3),
            ))?;
            let pdpe = present(ld64(
                (pml4e & PG_ADDRESS_MASK) + (((addr >> 30) & 0x1ff) << 3),
            ))?;
            if pdpe & PG_PSE != 0 {
                return Some(page_address(pdpe, 1 << 30, addr));
            }
            pdpe
        } else {
            present(ld64((regs.cr3 & !0x1f) + ((addr >> 27) & 0x18)))?
        };
        let pde = present(ld64(
            (pdpe & PG_ADDRESS_MASK) + (((addr >> 21) & 0x1ff) << 3),
        ))?;
        if pde & PG_PSE != 0 {
            (pde, 1 << 21)
        } else {
            let pte = ld64((pde & PG_ADDRESS_MASK) + (((addr >> 12) & 0x1ff) << 3));
            (present(pte)?, 1 << 12)
        }
    } else {
        let pde = present(ld32((regs.cr3 & !0xfff) + ((addr >> 20) & 0xffc)))?;
        if pde & PG_PSE != 0 && regs.cr4 & CR4_PSE != 0 {
            // PSE-36: bits 13-20 of a 4 MiB page's entry are bits 32-39 of its address.
            (pde | ((pde & 0x1f_e000) << 19), 1 << 22)
        } else {
            let pte = ld32((pde & 0xffff_f000) + ((addr >> 10) & 0xffc));
            (present(pte)?, 1 << 12)
        }
    };
    Some(page_address(pte, page_size, addr))
}

/// The end of QEMU's debug walk: the page's frame from its entry, and where in a large
/// page the 4 KiB page lies.
fn page_address(pte: u64, page_size: u64, addr: u64) -> u64 {
    (pte & PG_ADDRESS_MASK & !(page_size - 1)) | (addr & (page_size - 1))
}

/// Guest-physical reads for the monitor's page walks: what nothing maps reads as zeroes,
/// as QEMU's unassigned memory does.
pub fn debug_reader(
    services: &hw::core::services::MachineServices,
) -> impl Fn(u64, &mut [u8]) + '_ {
    move |addr, buf| {
        if services.is_assigned(addr, buf.len() as u64) {
            services.read_physical(addr, buf);
        } else {
            buf.fill(0);
        }
    }
}

/// QEMU's `cpu_memory_rw_debug` for reads: `buf.len()` bytes at virtual `addr` as the
/// CPU's tables map them (one to one with paging off), page by page. False, with `buf`
/// partly filled, where a page is not mapped or maps to memory nothing backs (`assigned`
/// says which guest-physical ranges something backs).
pub fn read_virtual(
    regs: &PagingRegisters,
    read: ReadPhys,
    assigned: &dyn Fn(u64, u64) -> bool,
    addr: u64,
    buf: &mut [u8],
) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let va = addr.wrapping_add(done as u64);
        let n = (buf.len() - done).min((0x1000 - (va & 0xfff)) as usize);
        let Some(page) = translate_page(regs, read, va) else {
            return false;
        };
        let at = page + (va & 0xfff);
        if !assigned(at, n as u64) {
            return false;
        }
        read(at, &mut buf[done..done + n]);
        done += n;
    }
    true
}

/// Calls `page(virt, phys, size)` for every present page the CPU's tables map, by
/// virtual address (QEMU's `x86_cpu_get_memory_mapping`, for `dump-guest-memory` with
/// `paging`): 4 KiB pages and the large ones (4 MiB or 2 MiB, 1 GiB) as they are. Reads
/// at most [`MAX_TABLES`] tables, so tables that point at one another end the walk.
#[cfg(test)]
pub fn for_each_page(regs: &PagingRegisters, read: ReadPhys, page: &mut dyn FnMut(u64, u64, u64)) {
    let mut budget = MAX_TABLES;
    for_each_page_within(regs, read, &mut budget, page);
}

/// [`for_each_page`] reading at most `budget` tables, which it counts down (walks of
/// several CPUs can share one).
pub fn for_each_page_within(
    regs: &PagingRegisters,
    read: ReadPhys,
    budget: &mut usize,
    page: &mut dyn FnMut(u64, u64, u64),
) {
    let Some(mode) = mode(regs) else {
        return;
    };
    let mut table = |addr: u64, count: usize, wide: bool| -> Option<Vec<u64>> {
        *budget = budget.checked_sub(1)?;
        Some(if wide {
            table64(read, addr, count)
        } else {
            table32(read, addr)
        })
    };
    // The frame of a leaf entry: its address bits, NX and the large-page PAT bit cleared.
    let frame = |entry: u64, size: u64| entry & ADDR_MASK & !(size - 1);
    match mode {
        Mode::Bits32 => {
            let Some(pgd) = table(regs.cr3 & 0xffff_f000, 1024, false) else {
                return;
            };
            for (i, pde) in pgd.into_iter().enumerate() {
                let virt = (i as u64) << 22;
                if pde & PG_PRESENT == 0 {
                    continue;
                }
                if pde & PG_PSE != 0 && regs.cr4 & CR4_PSE != 0 {
                    // PSE-36: bits 13-20 of the entry are physical bits 32-39.
                    let phys = (pde & 0xffc0_0000) | ((pde & 0x1f_e000) << 19);
                    page(virt, phys, 1 << 22);
                    continue;
                }
                let Some(pt) = table(pde & 0xffff_f000, 1024, false) else {
                    return;
                };
                for (j, pte) in pt.into_iter().enumerate() {
                    if pte & PG_PRESENT != 0 {
                        page(virt | (j as u64) << 12, pte & 0xffff_f000, 1 << 12);
                    }
                }
            }
        }
        Mode::Pae32 => {
            let Some(pdpt) = table(regs.cr3 & !0x1f, 4, true) else {
                return;
            };
            for (i, pdpe) in pdpt.into_iter().enumerate() {
                if pdpe & PG_PRESENT == 0 {
                    continue;
                }
                if !walk_pd(&mut table, pdpe, (i as u64) << 30, page, &frame) {
                    return;
                }
            }
        }
        Mode::La48 | Mode::La57 => {
            let levels = if matches!(mode, Mode::La57) { 5 } else { 4 };
            walk_upper(
                &mut table,
                regs,
                regs.cr3 & ADDR_MASK,
                levels,
                0,
                page,
                &frame,
            );
        }
    }
}

/// A table-reading closure with its budget: `None` once spent.
type TableReader<'a> = dyn FnMut(u64, usize, bool) -> Option<Vec<u64>> + 'a;

/// The levels above the page directory in long mode (PML5, PML4, PDPT with its 1 GiB
/// pages). Returns false once the budget is spent.
fn walk_upper(
    table: &mut TableReader,
    regs: &PagingRegisters,
    addr: u64,
    level: u32,
    base: u64,
    page: &mut dyn FnMut(u64, u64, u64),
    frame: &dyn Fn(u64, u64) -> u64,
) -> bool {
    let Some(entries) = table(addr, 512, true) else {
        return false;
    };
    let shift = 12 + 9 * (level - 1);
    for (i, e) in entries.into_iter().enumerate() {
        if e & PG_PRESENT == 0 {
            continue;
        }
        let virt = canonical(regs, base | (i as u64) << shift);
        let more = match level {
            3 if e & PG_PSE != 0 => {
                page(virt, frame(e, 1 << 30), 1 << 30);
                true
            }
            3 => walk_pd(table, e, virt, page, frame),
            _ => walk_upper(table, regs, e & ADDR_MASK, level - 1, virt, page, frame),
        };
        if !more {
            return false;
        }
    }
    true
}

/// A 512-entry page directory (PAE and long mode) and its page tables, mapping from
/// `base`. Returns false once the budget is spent.
fn walk_pd(
    table: &mut TableReader,
    pdpe: u64,
    base: u64,
    page: &mut dyn FnMut(u64, u64, u64),
    frame: &dyn Fn(u64, u64) -> u64,
) -> bool {
    let Some(pd) = table(pdpe & ADDR_MASK, 512, true) else {
        return false;
    };
    for (i, pde) in pd.into_iter().enumerate() {
        let virt = base | (i as u64) << 21;
        if pde & PG_PRESENT == 0 {
            continue;
        }
        if pde & PG_PSE != 0 {
            page(virt, frame(pde, 1 << 21), 1 << 21);
            continue;
        }
        let Some(pt) = table(pde & ADDR_MASK, 512, true) else {
            return false;
        };
        for (j, pte) in pt.into_iter().enumerate() {
            if pte & PG_PRESENT != 0 {
                page(virt | (j as u64) << 12, pte & ADDR_MASK, 1 << 12);
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Guest memory holding `entries` (address, value, width in bytes), zero elsewhere.
    fn memory(entries: &[(u64, u64, usize)]) -> HashMap<u64, u8> {
        let mut bytes = HashMap::new();
        for &(addr, value, width) in entries {
            for (i, b) in value.to_le_bytes()[..width].iter().enumerate() {
                bytes.insert(addr + i as u64, *b);
            }
        }
        bytes
    }

    fn reader(bytes: &HashMap<u64, u8>) -> impl Fn(u64, &mut [u8]) + '_ {
        move |addr, buf: &mut [u8]| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = bytes.get(&(addr + i as u64)).copied().unwrap_or(0);
            }
        }
    }

    fn regs(cr4: u64, efer: u64) -> PagingRegisters {
        PagingRegisters {
            cr0: CR0_PG | 0x11,
            cr3: 0x10_1000,
            cr4,
            efer,
        }
    }

    #[test]
    fn paging_off_is_qemus_message() {
        let none = HashMap::new();
        let regs = PagingRegisters::default();
        assert_eq!(info_tlb(&regs, &reader(&none)), "PG disabled\n");
        assert_eq!(info_mem(&regs, &reader(&none)), "PG disabled\n");
    }

    // The expected lines are QEMU 7.2's (TCG) for the same tables, set up by a multiboot
    // kernel that loads CR3 = 0x101000 and turns paging on.

    #[test]
    fn four_level_paging_as_qemu_prints_it() {
        let m = memory(&[
            (0x10_1000, 0x10_2007, 8),
            (0x10_1000 + 511 * 8, 0x10_5003, 8),
            (0x10_2000, 0x10_3007, 8),
            (0x10_3000, 0xa3, 8),
            (0x10_3008, 0x10_4007, 8),
            (0x10_4000, 0x30_0067, 8),
            (0x10_4008, (1 << 63) | 0x30_1025, 8),
            (0x10_4000 + 5 * 8, 0x30_5019, 8),
            (0x10_5000 + 511 * 8, 0x4000_0183, 8),
        ]);
        let regs = regs(CR4_PAE, EFER_LMA | (1 << 8));
        assert_eq!(
            info_tlb(&regs, &reader(&m)),
            "0000000000000000: 0000000000000000 --P-A---W\n\
             0000000000200000: 0000000000300000 ---DA--UW\n\
             0000000000201000: 0000000000301000 X---A--U-\n\
             0000000000205000: 0000000000305000 -----CT--\n\
             ffffffffc0000000: 0000000040000000 -GP-----W\n"
        );
        assert_eq!(
            info_mem(&regs, &reader(&m)),
            "0000000000000000-0000000000200000 0000000000200000 -rw\n\
             0000000000200000-0000000000201000 0000000000001000 urw\n\
             0000000000201000-0000000000202000 0000000000001000 ur-\n\
             0000000000205000-0000000000206000 0000000000001000 -r-\n\
             ffffffffc0000000-0001000000000000 0000000040000000 -rw\n"
        );
    }

    #[test]
    fn thirty_two_bit_paging_as_qemu_prints_it() {
        let m = memory(&[
            (0x10_1000, 0xa3, 4),
            (0x10_1004, 0x10_2007, 4),
            (0x10_2000, 0x30_0067, 4),
            (0x10_2000 + 3 * 4, 0x30_3005, 4),
            (0x10_1000 + 768 * 4, 0x40_0083, 4),
        ]);
        let regs = regs(CR4_PSE, 0);
        assert_eq!(
            info_tlb(&regs, &reader(&m)),
            "0000000000000000: 0000000000000000 --P-A---W\n\
             0000000000400000: 0000000000300000 ---DA--UW\n\
             0000000000403000: 0000000000303000 -------U-\n\
             00000000c0000000: 0000000000400000 --P-----W\n"
        );
        assert_eq!(
            info_mem(&regs, &reader(&m)),
            "0000000000000000-0000000000400000 0000000000400000 -rw\n\
             0000000000400000-0000000000401000 0000000000001000 urw\n\
             0000000000403000-0000000000404000 0000000000001000 ur-\n\
             00000000c0000000-00000000c0400000 0000000000400000 -rw\n"
        );
    }

    #[test]
    fn pae_paging_as_qemu_prints_it() {
        let m = memory(&[
            (0x10_1000, 0x10_2001, 8),
            (0x10_2000, 0xa3, 8),
            (0x10_2008, 0x10_3007, 8),
            (0x10_3000, 0x30_0067, 8),
            (0x10_3008, (1 << 63) | 0x30_1025, 8),
            (0x10_1018, 0x10_4001, 8),
            (0x10_4000 + 511 * 8, 0xffe0_0081, 8),
        ]);
        let regs = regs(CR4_PAE, 0);
        // QEMU keeps the NX bit in a PAE 4 KiB page's address.
        assert_eq!(
            info_tlb(&regs, &reader(&m)),
            "0000000000000000: 0000000000000000 --P-A---W\n\
             0000000000200000: 0000000000300000 ---DA--UW\n\
             0000000000201000: 8000000000301000 X---A--U-\n\
             00000000ffe00000: 00000000ffe00000 --P------\n"
        );
        assert_eq!(
            info_mem(&regs, &reader(&m)),
            "0000000000000000-0000000000200000 0000000000200000 -rw\n\
             0000000000200000-0000000000201000 0000000000001000 urw\n\
             0000000000201000-0000000000202000 0000000000001000 ur-\n\
             00000000ffe00000-0000000100000000 0000000000200000 -r-\n"
        );
    }

    /// The tables of `four_level_paging_as_qemu_prints_it`.
    fn four_level_tables() -> HashMap<u64, u8> {
        memory(&[
            (0x10_1000, 0x10_2007, 8),
            (0x10_1000 + 511 * 8, 0x10_5003, 8),
            (0x10_2000, 0x10_3007, 8),
            (0x10_3000, 0xa3, 8),
            (0x10_3008, 0x10_4007, 8),
            (0x10_4000, 0x30_0067, 8),
            (0x10_4008, (1 << 63) | 0x30_1025, 8),
            (0x10_4000 + 5 * 8, 0x30_5019, 8),
            (0x10_5000 + 511 * 8, 0x4000_0183, 8),
        ])
    }

    /// QEMU 7.2's `gva2gpa` on KVM for the same kernel (EFER.NXE off, qemu64 without
    /// pdpe1gb) translates the NX page and the 1 GiB page.
    #[test]
    fn debug_walk_ignores_reserved_bits_as_qemu_does() {
        let m = four_level_tables();
        let read = reader(&m);
        let regs = regs(CR4_PAE, EFER_LMA | (1 << 8));
        let t = |addr: u64| translate_page(&regs, &read, addr);
        assert_eq!(t(0x20_0234), Some(0x30_0000));
        assert_eq!(t(0x20_1234), Some(0x30_1000), "NX without EFER.NXE");
        assert_eq!(t(0x1234), Some(0x1000), "in a 2 MiB page");
        assert_eq!(t(0xffff_ffff_c000_1234), Some(0x4000_1000), "1 GiB page");
        assert_eq!(t(u64::MAX), Some(0x7fff_f000));
        assert_eq!(t(0x20_2000), None, "absent PTE");
        assert_eq!(t(0x40_0000), None, "absent PDE");
        assert_eq!(t(0x8000_0000_0000), None, "not canonical");
        assert_eq!(t(0xffff_0000_0000_0000), None, "not canonical");
        // Paging off: virtual is physical.
        let off = PagingRegisters::default();
        assert_eq!(translate_page(&off, &read, 0x1234_5678), Some(0x1234_5000));
    }

    #[test]
    fn debug_walk_in_32_bit_and_pae_modes() {
        // 32-bit: a PSE-36 4 MiB page at 0xc0000000 whose frame is above 4 GiB.
        let m = memory(&[
            (0x10_1004, 0x10_2007, 4),
            (0x10_2000 + 3 * 4, 0x30_3005, 4),
            (0x10_1000 + 768 * 4, 0x40_2083, 4),
        ]);
        let read = reader(&m);
        let r32 = regs(CR4_PSE, 0);
        assert_eq!(translate_page(&r32, &read, 0x40_3abc), Some(0x30_3000));
        assert_eq!(translate_page(&r32, &read, 0x40_4000), None);
        assert_eq!(
            translate_page(&r32, &read, 0xc012_3456),
            Some(0x1_0052_3000),
            "PSE-36 bits 13-20 are address bits 32-39"
        );
        // Without CR4.PSE the same entry points at a page table.
        let no_pse = regs(0, 0);
        assert_eq!(translate_page(&no_pse, &read, 0xc000_0000), None);
        // PAE: the NX bit is not part of the address.
        let m = memory(&[
            (0x10_1000, 0x10_2001, 8),
            (0x10_2008, 0x10_3007, 8),
            (0x10_3008, (1 << 63) | 0x30_1025, 8),
        ]);
        let read = reader(&m);
        let pae = regs(CR4_PAE, 0);
        assert_eq!(translate_page(&pae, &read, 0x20_1fff), Some(0x30_1000));
        assert_eq!(translate_page(&pae, &read, 0x4000_0000), None);
    }

    /// A PML4 whose every entry points back at itself (a guest can write that): each level
    /// of the walk reads it again, 512^4 mappings in all.
    fn self_mapped(addr: u64, buf: &mut [u8]) {
        assert!(
            addr.is_multiple_of(8) && buf.len().is_multiple_of(8),
            "whole entries"
        );
        let entry: u64 = if addr & !0xfff == 0x10_1000 {
            0x10_1007
        } else {
            0
        };
        for e in buf.chunks_exact_mut(8) {
            e.copy_from_slice(&entry.to_le_bytes());
        }
    }

    #[test]
    fn a_self_mapped_pml4_stops_at_the_line_limit() {
        let regs = regs(CR4_PAE, EFER_LMA);
        let tlb = info_tlb(&regs, &self_mapped);
        let lines: Vec<&str> = tlb.lines().collect();
        assert_eq!(lines.len(), MAX_LINES + 1);
        assert_eq!(lines[0], "0000000000000000: 0000000000101000 -------UW");
        assert_eq!(lines[1], "0000000000001000: 0000000000101000 -------UW");
        assert_eq!(
            lines[MAX_LINES],
            "(info tlb stopped after 131072 lines: qomvm prints at most that many at once)"
        );
        let small = WalkLimits {
            lines: 2,
            tables: 100,
        };
        assert_eq!(
            info_tlb_limited(&regs, &self_mapped, small),
            "0000000000000000: 0000000000101000 -------UW\n\
             0000000000001000: 0000000000101000 -------UW\n\
             (info tlb stopped after 2 lines: qomvm prints at most that many at once)\n"
        );
        // `info mem` merges the mappings into one range, but still walks them all.
        let mem = info_mem(&regs, &self_mapped);
        assert_eq!(
            mem,
            "(info mem stopped after reading 65536 page tables: qomvm walks at most that \
             many at once)\n"
        );
    }

    #[test]
    fn tables_that_map_nothing_stop_at_the_table_limit() {
        // Every PML4, PDPT and PD entry present, every page table empty: 512^3 tables to
        // read, no line to print.
        let fan = |addr: u64, buf: &mut [u8]| {
            for (i, b) in buf.iter_mut().enumerate() {
                let at = addr + i as u64;
                let entry: u64 = match at & !0xfff {
                    0x10_1000 => 0x10_2007,
                    0x10_2000 => 0x10_3007,
                    0x10_3000 => 0x10_4007,
                    _ => 0,
                };
                *b = entry.to_le_bytes()[(at & 7) as usize];
            }
        };
        let regs = regs(CR4_PAE, EFER_LMA);
        let limits = WalkLimits {
            lines: 10,
            tables: 1000,
        };
        assert_eq!(
            info_tlb_limited(&regs, &fan, limits),
            "(info tlb stopped after reading 1000 page tables: qomvm walks at most that many \
             at once)\n"
        );
        // Within the limits nothing changes: QEMU's output, no last line.
        let m = four_level_tables();
        let regs = super::tests::regs(CR4_PAE, EFER_LMA);
        let exact = WalkLimits {
            lines: 5,
            tables: 6,
        };
        assert_eq!(
            info_tlb_limited(&regs, &reader(&m), exact),
            info_tlb(&regs, &reader(&m))
        );
        assert!(!info_tlb(&regs, &reader(&m)).contains("stopped"));
    }

    /// Every page `for_each_page` reports, `(virt, phys, size)`.
    fn pages(regs: &PagingRegisters, bytes: &HashMap<u64, u8>) -> Vec<(u64, u64, u64)> {
        let mut seen = Vec::new();
        for_each_page(regs, &reader(bytes), &mut |v, p, s| seen.push((v, p, s)));
        seen
    }

    #[test]
    fn a_dump_walk_reports_32bit_pages_both_sizes() {
        // PSE: a 4 MiB page at 0xc0000000 -> 0x1_0040_0000 (PSE-36 bits), a table at 0.
        let bytes = memory(&[
            (0x10_1000 + 0x300 * 4, 0x40_0083 | (1 << 13), 4),
            (0x10_1000, 0x10_2001, 4),
            (0x10_2000 + 5 * 4, 0x7_7001, 4),
        ]);
        assert_eq!(
            pages(&regs(CR4_PSE, 0), &bytes),
            [
                (0x5000, 0x7_7000, 0x1000),
                (0xc000_0000, 0x1_0040_0000, 0x40_0000)
            ]
        );
    }

    #[test]
    fn a_dump_walk_reports_pae_pages() {
        let bytes = memory(&[
            (0x10_1000 + 3 * 8, 0x10_2001, 8),
            (0x10_2000 + 8, 0x20_0083 | (1 << 12), 8), // 2 MiB, PAT bit set
            (0x10_2000 + 16, 0x10_3001, 8),
            (0x10_3000 + 8, 0x8000_0000_0009_9003, 8), // NX
        ]);
        assert_eq!(
            pages(&regs(CR4_PAE, 0), &bytes),
            [
                (0xc020_0000, 0x20_0000, 0x20_0000),
                (0xc040_1000, 0x9_9000, 0x1000)
            ]
        );
    }

    #[test]
    fn a_dump_walk_reports_long_mode_pages_at_canonical_addresses() {
        // PML4 entry 511 -> PDPT: entry 510 a 1 GiB page, entry 511 -> PD -> PT.
        let bytes = memory(&[
            (0x10_1000 + 511 * 8, 0x10_2003, 8),
            (0x10_2000 + 510 * 8, 0x4000_0083, 8),
            (0x10_2000 + 511 * 8, 0x10_3003, 8),
            (0x10_3000, 0x10_4003, 8),
            (0x10_4000 + 8, 0x5000, 8), // not present
            (0x10_4000 + 16, 0x6003, 8),
        ]);
        assert_eq!(
            pages(&regs(CR4_PAE, EFER_LMA), &bytes),
            [
                (0xffff_ffff_8000_0000, 0x4000_0000, 1 << 30),
                (0xffff_ffff_c000_2000, 0x6000, 0x1000),
            ]
        );
    }

    #[test]
    fn a_dump_walk_through_tables_that_loop_ends() {
        // Every PML4 entry points back at the PML4 and every level below does too: the
        // walk stops at its table budget instead of reading billions of tables.
        let looping = |_: u64, buf: &mut [u8]| {
            for entry in buf.chunks_exact_mut(8) {
                entry.copy_from_slice(&0x10_1003u64.to_le_bytes());
            }
        };
        let mut count = 0u64;
        for_each_page(&regs(CR4_PAE, EFER_LMA), &looping, &mut |_, _, _| {
            count += 1
        });
        assert!(count <= (MAX_TABLES as u64) * 512, "{count}");
    }

    #[test]
    fn a_dump_walk_without_paging_reports_nothing() {
        let mut r = regs(0, 0);
        r.cr0 = 0x11;
        assert!(pages(&r, &memory(&[])).is_empty());
    }
}
