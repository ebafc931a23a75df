//! Helpers shared by qomvm's integration tests (`tests/*.rs`) and benches: hand-assembled
//! x86 guests ([`guest`]) and Multiboot ELF kernels ([`elf`]), a raw KVM runner to compare
//! qomvm with ([`raw_kvm`]), and test machines on KVM ([`vm`]).

pub mod elf;
pub mod guest;
pub mod raw_kvm;
pub mod vm;
