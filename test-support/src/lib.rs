//! Helpers shared by qomvm's integration tests (`tests/*.rs`) and benches: hand-assembled
//! x86 guests ([`guest`]) and Multiboot ELF kernels ([`elf`]), a raw KVM runner to compare
//! qomvm with ([`raw_kvm`]), test machines on KVM ([`vm`]) and on qtest ([`qtest`]), a guest
//! that reports the interrupts it takes ([`irq_guest`]), a boot sector or PXE program
//! that prints and powers off ([`boot_program`]), skips made visible ([`skip`]), a QMP
//! client ([`qmp`]), a datagram-socket network backend ([`dgram_netdev`]) and a PCI network
//! card's harness over it ([`nic_card`]), an SMBIOS reader ([`smbios`]), a VGA text-screen
//! reader ([`vga_text`]), a virtio-gpu driver and the pictures it shows ([`virtio_gpu`]),
//! VNC Authentication's DES for clients and password files ([`vnc`]) and what the USB host
//! controller tests share: the board, setup packets, descriptors, HID reports and Bulk-Only
//! ([`usb`]).

pub mod boot_program;
pub mod console;
pub mod dgram_netdev;
pub mod drives;
pub mod elf;
pub mod fuzz;
pub mod fuzz_qtest;
pub mod guest;
pub mod irq_guest;
pub mod migration_guest;
pub mod netns;
pub mod nic_card;
pub mod qmp;
pub mod qtest;
pub mod raw_kvm;
pub mod skip;
pub mod smbios;
pub mod usb;
pub mod vga_text;
pub mod virtio;
pub mod virtio_gpu;
pub mod vm;
pub mod vnc;
